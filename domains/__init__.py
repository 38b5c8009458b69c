"""Built-in mbn domain plugins; importing this package registers them (mbn does it lazily)."""

from domains import pgd  # noqa: F401
from domains import autoaug, clean, noise  # noqa: F401
