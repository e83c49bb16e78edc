"""``python -m cli``: the same as the ``crosstalk`` console script."""

from cli.app import app

app(prog_name="crosstalk")
