"""CoNLL-style token classification files: one token per line with its tag in the last field, a blank
line after each sentence (WNUT, CoNLL-2003 and most NER corpora)."""
from __future__ import annotations

from pathlib import Path

import datasets

from lora_lab.errors import ConfigError


def _shown(line: str, limit: int = 60) -> str:
    return repr(line if len(line) <= limit else line[:limit] + "...")


def read_conll(path, key: str = "data.files.train", require_tags: bool = True):
    """A ``datasets.Dataset`` with the columns ``tokens`` and ``ner_tags`` (both lists of strings).

    Fields are split on tabs when the line has one, else on whitespace, so the token is the first
    field and the tag the last (CoNLL-2003's four columns work too). Whitespace-only lines end a
    sentence, ``-DOCSTART-`` lines are skipped, and a last sentence without a blank line after it
    counts. Anything unreadable is a ``ConfigError(key, path, problem)``.

    ``require_tags=False`` also reads a file of tokens alone, one per line (text to tag): it has
    only the ``tokens`` column. A file that tags some tokens and not others is refused.
    """
    name = str(path)
    file = Path(path).expanduser()
    if file.is_dir():
        raise ConfigError(key, name, "is a directory, not a file")
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(key, name, "does not exist") from None
    except OSError as error:
        raise ConfigError(key, name, f"could not be read: {error.strerror or error}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as bad:
        offset = bad.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)
        number = raw.count(b"\n", 0, offset) + 1
        raise ConfigError(key, name, f"is not UTF-8 text: line {number} has the byte 0x{raw[offset]:02x}; "
                          "save the file as UTF-8") from None

    all_tokens, all_tags = [], []
    tokens, tags = [], []
    untagged, first = None, 0  # whether the token lines have no tag, as the first one (line ``first``)
    # split("\n"), not splitlines(): tweets may hold U+2028 or U+0085, which must stay inside a token
    for number, line in enumerate(text.split("\n"), 1):
        fields = line.split("\t") if "\t" in line else line.split()
        fields = [field.strip() for field in fields if field.strip()]
        if not fields or fields[0] == "-DOCSTART-":
            if tokens:
                all_tokens.append(tokens)
                all_tags.append(tags)
                tokens, tags = [], []
            continue
        if len(fields) < 2 and require_tags:
            raise ConfigError(key, name, f"line {number}: expected a token and a tag, got {_shown(line.strip())}")
        if untagged is None:
            untagged = len(fields) < 2
        elif untagged != (len(fields) < 2):
            raise ConfigError(key, name, f"line {number}: {'a token and a tag' if untagged else 'a token alone'}, "
                              f"unlike line {first}; tag every token or none")
        first = first or number
        tokens.append(fields[0])
        tags.append(None if untagged else fields[-1])
    if tokens:
        all_tokens.append(tokens)
        all_tags.append(tags)
    if not all_tokens:
        raise ConfigError(key, name, "has no sentences (expected lines of a token and a tag, "
                          "a blank line after each sentence)")
    if untagged:
        return datasets.Dataset.from_dict({"tokens": all_tokens})
    return datasets.Dataset.from_dict({"tokens": all_tokens, "ner_tags": all_tags})
