"""Text: the paper's lowercased BPE tokenizer with one padding token per text position."""

from dalle_core.text.bpe import (
    BYTE_ALPHABET_SIZE,
    FORMAT_NAME,
    FORMAT_VERSION,
    UNK_TOKEN,
    DalleTokenizer,
    TextConfig,
    TextEncoding,
    train_bpe_tokenizer,
)

__all__ = [
    "BYTE_ALPHABET_SIZE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "UNK_TOKEN",
    "DalleTokenizer",
    "TextConfig",
    "TextEncoding",
    "train_bpe_tokenizer",
]
