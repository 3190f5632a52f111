"""Deprecated module path, kept for one release: `lit_fast.module.LitTransformer` is `lit_fast.LitTransformer`. See
CHANGELOG.md."""

from lit_fast.tasks.base import LitTransformer

__all__ = ["LitTransformer"]
