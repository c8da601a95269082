"""Text: the paper's lowercased BPE tokenizer with one padding token per text position."""

from dalle_core.text.bpe import (
    BYTE_ALPHABET_SIZE,
    FORMAT_NAME,
    FORMAT_VERSION,
    TEXT_PRESETS,
    UNK_TOKEN,
    DalleTokenizer,
    TextConfig,
    TextEncoding,
    text_config,
    train_bpe_tokenizer,
)

__all__ = [
    "BYTE_ALPHABET_SIZE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "TEXT_PRESETS",
    "UNK_TOKEN",
    "DalleTokenizer",
    "TextConfig",
    "TextEncoding",
    "text_config",
    "train_bpe_tokenizer",
]
