"""Fixed sentence sets for measuring a compressed sentence encoder against its fp32 original.

Varied in topic and length, written for this purpose (no download); the calibration set (Wanda, static int8)
never overlaps the evaluation set, so fidelity is measured on sentences the compression never saw.
"""

from __future__ import annotations

__all__ = ["CALIBRATION_SENTENCES", "EVAL_SENTENCES"]

EVAL_SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "Interest rates rose for the third time this year.",
    "How do I reset my password if I no longer have access to my email?",
    "The orchestra tuned their instruments before the concert began.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She scored the winning goal in the final minute of extra time.",
    "Please remind me to buy milk and eggs on the way home.",
    "The new phone has a brighter screen but a smaller battery.",
    "Glaciers in the Alps have lost a third of their volume since 1980.",
    "Can you recommend a good Italian restaurant near the station?",
    "The defendant pleaded not guilty to all charges.",
    "A gentle breeze moved through the tall grass of the meadow.",
    "Our quarterly revenue exceeded analyst expectations by five percent.",
    "The algorithm sorts the list in O(n log n) time.",
    "Children learn languages faster than most adults do.",
    "The museum is closed on Mondays and public holidays.",
    "He fixed the leaking tap with a new rubber washer.",
    "Vaccines train the immune system to recognise a pathogen.",
    "The flight to Lisbon was delayed by two hours because of fog.",
    "Add the onions and fry them until they are golden brown.",
    "The treaty was signed by twelve nations in 1957.",
    "My laptop keeps overheating when I run the video editor.",
    "The bridge spans nearly two kilometres across the bay.",
    "Dark matter does not emit, absorb or reflect light.",
    "Remember to water the tomatoes every morning during the heatwave.",
    "The startup raised forty million dollars in its latest round.",
    "Ancient Romans built aqueducts to carry water into their cities.",
    "The referee showed him a red card for the reckless tackle.",
    "Wash your hands thoroughly before preparing food.",
    "The novel follows three generations of a family in rural Ireland.",
    "Electric cars are becoming cheaper to buy and to run.",
    "This software update fixes a security vulnerability in the browser.",
]

CALIBRATION_SENTENCES = [
    "The weather forecast predicts heavy rain tomorrow afternoon.",
    "Students must submit their essays before Friday at noon.",
    "The committee approved the budget after a long debate.",
    "A small bakery on the corner sells fresh bread every morning.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The train was crowded with commuters heading into the city.",
    "She painted the fence a bright shade of blue.",
    "The company announced plans to open three new factories.",
    "He forgot his umbrella and got soaked on the way to work.",
    "Mountains in the north are covered with snow for half the year.",
    "The software crashed whenever the user opened a large file.",
    "Doctors recommend at least seven hours of sleep each night.",
    "The festival attracts thousands of visitors every summer.",
    "Prices of fruit and vegetables went up after the drought.",
    "The library extended its opening hours during exam season.",
    "Engineers tested the prototype under extreme temperatures.",
    "Our neighbours adopted a puppy from the local shelter.",
    "The river flooded the valley after days of heavy rain.",
    "The teacher explained the theorem with a simple drawing.",
    "Tickets for the match sold out within ten minutes.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Astronomers observed a supernova in a distant galaxy.",
    "The hotel offers free breakfast and airport transfers.",
    "Voters will choose a new mayor in the spring election.",
]
