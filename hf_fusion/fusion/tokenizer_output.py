"""The output's tokenizer, written by transformers in place of the copied one, and ``vocab_size`` to match."""

from __future__ import annotations

from pathlib import Path

from hf_fusion.fusion.vocabularies import VocabularyAlignment
from hf_fusion.model_files import remove_tokenizer_files, set_config_vocab_size


def write_tokenizer(alignment: VocabularyAlignment | None, dest: Path) -> None:
    """Replaces the reference's tokenizer files in ``dest`` with the aligned tokenizer (``save_pretrained`` writes
    its vocabulary, added tokens and ``chat_template.jinja``), and sets ``vocab_size`` to the output's rows."""
    if alignment is None:
        return
    remove_tokenizer_files(dest)
    alignment.tokenizer.save_pretrained(str(dest))
    if alignment.rows is not None:
        set_config_vocab_size(dest, alignment.rows)
