"""The dataset card (README.md) of a cache: a template and small pure functions that fill it."""

from .render import card_data, data_prefix, index_entry, index_from_card_data, render_card, render_index_card, summary_rows

__all__ = ["card_data", "data_prefix", "index_entry", "index_from_card_data", "render_card", "render_index_card", "summary_rows"]
