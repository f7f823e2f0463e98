"""Data: readers and validation, the Tulu chat format with assistant-only labels, collators, samplers,
DataModules."""

from rose_pl.data.chat import ChatEncoder, EmptyLossError, encode_messages, encode_preference, format_tulu
from rose_pl.data.collate import PreferenceCollator, SFTCollator
from rose_pl.data.datamodule import FeatureDataModule, SFTDataModule
from rose_pl.data.formats import (
    Dropped,
    InstructionExample,
    PreferenceExample,
    read_instructions,
    read_preferences,
)
from rose_pl.data.samplers import LengthGroupedSampler, LengthSortedSampler, padding_fraction

__all__ = [
    "ChatEncoder",
    "Dropped",
    "EmptyLossError",
    "FeatureDataModule",
    "InstructionExample",
    "LengthGroupedSampler",
    "LengthSortedSampler",
    "PreferenceCollator",
    "PreferenceExample",
    "SFTCollator",
    "SFTDataModule",
    "encode_messages",
    "encode_preference",
    "format_tulu",
    "padding_fraction",
    "read_instructions",
    "read_preferences",
]
