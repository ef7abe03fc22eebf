"""Drafters behind one protocol (``base.Drafter``)."""

from lab.drafters.base import Draft, DraftContext, Drafter
from lab.drafters.draft_model import DraftModelDrafter
from lab.drafters.prompt_lookup import PromptLookupDrafter

__all__ = ["Draft", "DraftContext", "Drafter", "DraftModelDrafter", "PromptLookupDrafter"]
