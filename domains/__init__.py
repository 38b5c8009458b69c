"""Built-in mbn domain plugins; importing this package registers them (mbn does it lazily)."""

from mbn_domains import autoaug, clean, mix, noise, pgd, rotation  # noqa: F401
