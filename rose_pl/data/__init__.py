"""Data: readers and validation, chat templates, token ids with truncation that keeps the loss, collators,
samplers, DataModules."""

from rose_pl.data.collate import PreferenceCollator, SFTCollator
from rose_pl.data.datamodule import FeatureDataModule, SFTDataModule
from rose_pl.data.encoding import IGNORE_INDEX, EmptyLossError, Encoder
from rose_pl.data.formats import (
    Dropped,
    InstructionExample,
    PreferenceExample,
    read_instructions,
    read_preferences,
)
from rose_pl.data.samplers import LengthGroupedSampler, LengthSortedSampler, padding_fraction
from rose_pl.data.templates import ChatTemplate, MarkupTemplate, Piece, get_template

__all__ = [
    "ChatTemplate",
    "Dropped",
    "EmptyLossError",
    "Encoder",
    "FeatureDataModule",
    "IGNORE_INDEX",
    "InstructionExample",
    "LengthGroupedSampler",
    "LengthSortedSampler",
    "MarkupTemplate",
    "Piece",
    "PreferenceCollator",
    "PreferenceExample",
    "SFTCollator",
    "SFTDataModule",
    "get_template",
    "padding_fraction",
    "read_instructions",
    "read_preferences",
]
