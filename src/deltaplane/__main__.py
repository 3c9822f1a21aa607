"""``python -m deltaplane``: the same CLI as the ``deltaplane`` script, for environments without the script on PATH."""

from deltaplane.cli import app

if __name__ == "__main__":
    app(prog_name="deltaplane")
