"""Sentence sets for calibrating and measuring a compressed text model against its fp32 original.

Two sources, neither downloaded:

- :data:`EVAL_SENTENCES` / :data:`CALIBRATION_SENTENCES`: everyday English, varied in topic and length, written
  for this purpose; the calibration set (Wanda, static int8) never overlaps the evaluation set, so fidelity is
  measured on sentences the compression never saw.
- :func:`text_corpus`: thousands of English sentences that ship with Python itself — the docstrings of the
  standard library's modules, classes and functions (read with :mod:`ast` from the source files, nothing is
  imported or executed) and the language reference's help topics (:mod:`pydoc_data.topics`). Written by
  CPython's developers for people, the same on every machine with the same Python version. Distillation needs
  this much unlabeled text: 64 sentences are memorised within a few epochs (the student matches the teacher on
  them and nowhere else). The corpus is split by a hash of each sentence into a calibration part and an
  evaluation part (:func:`corpus_split`), so held-out text stays held out whichever size is asked for.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
from functools import lru_cache
from pathlib import Path

__all__ = ["CALIBRATION_SENTENCES", "EVAL_SENTENCES", "corpus_split", "text_corpus"]

_SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__"}
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _sentences(text: str) -> list[str]:
    """Prose sentences of ``text``: 40–200 ASCII characters, capitalised, ending in . ! or ?, mostly letters
    (code samples, tables and doctest lines are dropped)."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        if ">>>" in para or "::" in para:
            continue
        para = re.sub(r"\s+", " ", para).strip()
        for s in _SENTENCE_END.split(para):
            if not 40 <= len(s) <= 200 or not s.isascii() or not s[0].isupper() or s[-1] not in ".!?":
                continue
            if sum(c.isalpha() or c in " ,.'-" for c in s) / len(s) >= 0.9:
                out.append(s)
    return out


def _docstrings(root: Path) -> list[str]:
    docs = []
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue  # an unreadable file contributes nothing
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    docs.append(doc)
    return docs


def _key(sentence: str) -> bytes:
    return hashlib.sha256(sentence.encode()).digest()


@lru_cache(maxsize=1)
def text_corpus() -> tuple[str, ...]:
    """Every distinct prose sentence of the standard library's docstrings and help topics, in a fixed
    hash order (a deterministic shuffle); the hand-written evaluation sentences are never among them."""
    texts = _docstrings(Path(sysconfig.get_paths()["stdlib"]))
    try:
        from pydoc_data.topics import topics

        texts += [topics[k] for k in sorted(topics)]
    except ImportError:  # a Python built without pydoc_data still has its docstrings
        pass
    found = {s for t in texts for s in _sentences(t)} - set(EVAL_SENTENCES) - set(CALIBRATION_SENTENCES)
    return tuple(sorted(found, key=_key))


def corpus_split(calibration: int, evaluation: int = 0) -> tuple[list[str], list[str]]:
    """``calibration`` sentences to train or calibrate on and ``evaluation`` held-out ones, never overlapping.

    One sentence in ten (by the first byte of its SHA-256) belongs to the evaluation part, the rest to the
    calibration part; each part is taken in its fixed hash order, so asking for more calibration text never
    moves a sentence across the split.
    """
    corpus = text_corpus()
    held = [s for s in corpus if _key(s)[0] % 10 == 0]
    cal = [s for s in corpus if _key(s)[0] % 10 != 0]
    if calibration > len(cal) or evaluation > len(held):
        from deltaplane.errors import ConfigError

        raise ConfigError(
            f"the standard-library corpus has {len(cal)} calibration and {len(held)} evaluation sentences "
            f"on this Python; asked for {calibration} and {evaluation}"
        )
    return cal[:calibration], held[:evaluation]


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
    "The bus driver waited patiently for the last passenger.",
    "Our team finished the project two weeks ahead of schedule.",
    "A thick fog rolled in from the harbour before dawn.",
    "The pharmacist explained how often to take the tablets.",
    "Several houses lost power during the overnight storm.",
    "The chef recommends the grilled fish with lemon butter.",
    "Please send the signed contract back by Thursday.",
    "The spacecraft entered orbit around the red planet.",
    "My grandmother grows roses and lavender in her garden.",
    "The city council voted to expand the cycling network.",
    "He practised the piano for an hour every evening.",
    "The airline cancelled dozens of flights because of the strike.",
    "Researchers measured the temperature of the deep ocean.",
    "The shop offers a discount to students on weekdays.",
    "She wrote a letter to the editor about the new parking rules.",
    "Heavy traffic delayed the ambulance on the motorway.",
    "The children built a sandcastle near the water's edge.",
    "The server restarted automatically after the power cut.",
    "Farmers harvested the wheat earlier than usual this year.",
    "The lecture covered the history of the printing press.",
    "A stray cat slept under the porch all winter.",
    "The bank raised the fee for international transfers.",
    "Our printer ran out of ink in the middle of the report.",
    "The volcano has been quiet for more than a century.",
    "The new law requires helmets for all scooter riders.",
    "He learned to bake sourdough bread during the lockdown.",
    "The stadium lights failed halfway through the second half.",
    "Nurses worked extra shifts throughout the flu season.",
    "The hikers reached the summit just before sunset.",
    "A new bakery opened next to the railway station.",
    "The translator worked from French into Portuguese.",
    "Investors reacted nervously to the inflation figures.",
    "The puppy chewed through the charging cable overnight.",
    "The museum acquired a rare medieval manuscript.",
    "Students can borrow laptops from the university library.",
    "The ferry crossing takes about forty minutes in calm weather.",
    "The mechanic replaced the worn brake pads on my car.",
    "A sudden hailstorm damaged crops across the region.",
    "The app sends a notification when your parcel arrives.",
    "The choir rehearsed twice a week before the festival.",
]
