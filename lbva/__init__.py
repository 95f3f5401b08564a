"""lingbot-va-pretrain: the `lbva` namespace maps onto the repository's top-level folders.

`lbva.models` is models/, `lbva.training` is training/, and so on (see pyproject.toml).
`lbva.errors` holds the one exception type every package raises for user mistakes; `lbva.quiet`
sets up a command's output (quiet libraries unless --verbose), importable from anywhere, like it.
"""

__version__ = "0.1.0"
