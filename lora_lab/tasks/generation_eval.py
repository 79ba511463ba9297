"""Generation metrics of a causal LM (``trainer.generation.enabled=true``): greedy decoding (or beam
search, ``trainer.generation.num_beams``) of each prompt of an evaluation split, scored against the
reference responses with corpus BLEU (sacrebleu) and ROUGE-L F1 (rouge-score), as data-to-text
benchmarks such as E2E NLG report them.

Examples that share a prompt (E2E gives several human references per meaning representation) are
generated once, and that one text is scored against all their references: BLEU counts an n-gram as
matched up to its count in any one reference, ROUGE-L takes the best reference. Generation stops at
the end-of-text token examples end with (lora_lab.data.lm_data) or after ``max_new_tokens``; the text is
decoded without special tokens. References are the responses as the tokenizer writes them back
(lora_lab.data.lm_data), so a tokenizer that cannot write something (an uncased vocabulary cannot write
capitals) is not charged for it; for byte-level BPE vocabularies they are the text itself.

sacrebleu and rouge-score are an optional extra (``pip install "lora_lab[generation]"``), imported
only when generation is on.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from lora_lab.errors import ConfigError

INSTALL = 'pip install "lora_lab[generation]"'


def require_libraries() -> None:
    """sacrebleu and rouge-score are importable, else a one-line error saying how to install them."""
    missing = []
    for module, distribution in (("sacrebleu", "sacrebleu"), ("rouge_score", "rouge-score")):
        try:
            __import__(module)
        except ImportError:
            missing.append(distribution)
    if missing:
        raise ConfigError("trainer.generation.enabled", True, f"needs {' and '.join(missing)}: {INSTALL}")


@dataclass
class Prompt:
    text: str               # the prompt as the data gives it (before data.prompt_template)
    ids: list[int]          # the formatted prompt's tokens, as the model reads them
    references: list[str]   # every reference response of the examples with this prompt


def group_prompts(texts: list[str], ids: list[list[int]], references: list[str],
                  limit: int | None = None) -> list[Prompt]:
    """One entry per distinct prompt, in the order prompts first occur, with all their references;
    the first ``limit`` prompts only (None: all)."""
    grouped: dict[str, Prompt] = {}
    for text, prompt_ids, reference in zip(texts, ids, references):
        if text not in grouped:
            if limit is not None and len(grouped) >= limit:
                continue
            grouped[text] = Prompt(text, list(prompt_ids), [])
        grouped[text].references.append(reference)
    return list(grouped.values())


def prompts_of(dataset, limit: int | None = None) -> list[Prompt]:
    """The distinct prompts of a tokenised evaluation split (columns prompt, prompt_length, input_ids,
    reference: lora_lab.data.lm_data)."""
    columns = dataset.select_columns(["prompt", "prompt_length", "input_ids", "reference"])[:]
    ids = [row[:length] for row, length in zip(columns["input_ids"], columns["prompt_length"])]
    return group_prompts(columns["prompt"], ids, columns["reference"], limit)


def score(generations: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU (0-100) and mean ROUGE-L F1 (0-1) of each generation against its references."""
    from rouge_score import rouge_scorer, tokenizers
    from sacrebleu.metrics import BLEU

    if not generations:
        return {"bleu": float("nan"), "rouge_l": float("nan")}
    most = max(len(refs) for refs in references)
    # sacrebleu takes one stream per reference slot; a prompt with fewer references leaves None in the rest
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(most)]
    bleu = BLEU().corpus_score(generations, streams).score
    # the tokenizer given, not defaulted: defaulting logs through absl, which would give the root logger
    # a handler on whatever sys.stderr is at that moment
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizers.DefaultTokenizer(use_stemmer=False))
    rouge = [scorer.score_multi(refs, text)["rougeL"].fmeasure for text, refs in zip(generations, references)]
    return {"bleu": float(bleu), "rouge_l": float(statistics.fmean(rouge))}


def position_limit(model) -> int | None:
    """The longest sequence the model's position embeddings allow, when its config says."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, end_of_text: int, pad_token_id: int, max_new_tokens: int,
             batch_size: int, device, amp, decoding: dict | None = None) -> list[list[int]]:
    """The continuation of each prompt, up to (not including) the end-of-text token: greedy, or beam
    search with ``decoding`` (num_beams, length_penalty, no_repeat_ngram_size). Prompts of similar
    length are batched together, left-padded, and the answers come back in input order."""
    model.eval()
    limit = position_limit(model)
    # an empty prompt (no token before the response) has nothing to continue from: it gets no text
    order = sorted((i for i in range(len(prompts)) if prompts[i]), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        new_tokens = max_new_tokens if limit is None else min(max_new_tokens, limit - width)
        if new_tokens <= 0:  # the prompt fills the model's positions: nothing can follow
            continue
        ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, width - len(prompts[i]):] = torch.as_tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        settings = GenerationConfig(do_sample=False, max_new_tokens=new_tokens, eos_token_id=end_of_text,
                                    pad_token_id=pad_token_id, **(decoding or {}))
        with amp():
            sequences = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                       generation_config=settings)
        for row, i in enumerate(chunk):
            continuation = sequences[row, width:].tolist()
            if end_of_text in continuation:
                continuation = continuation[: continuation.index(end_of_text)]
            out[i] = continuation
    return out


class SplitGeneration:
    """The generation evaluation of one split: its distinct prompts (found once), generated and
    scored after each epoch. Over several ranks each generates every ``world_size``-th prompt and all
    get every text."""

    def __init__(self, dataset, tokenizer, settings, *, end_of_text: int, pad_token_id: int, batch_size: int):
        self.prompts = prompts_of(dataset, settings.get("max_examples"))
        self.tokenizer = tokenizer
        self.end_of_text, self.pad_token_id = end_of_text, pad_token_id
        self.max_new_tokens = int(settings.get("max_new_tokens") or 64)
        self.batch_size = int(settings.get("batch_size") or batch_size)
        self.keep = int(settings.get("keep_examples", 5) or 0)
        self.decoding = {"num_beams": int(settings.get("num_beams") or 1),
                         "length_penalty": float(settings.get("length_penalty", 1.0)),
                         "no_repeat_ngram_size": int(settings.get("no_repeat_ngram_size") or 0)}

    def run(self, model, device, amp, dist) -> tuple[dict[str, float], list[dict]]:
        """The split's ``bleu`` and ``rouge_l``, and its first generations as prompt / references /
        generation triples (``keep_examples`` of them)."""
        share = self.prompts[dist.rank::dist.world_size] if dist.enabled else self.prompts
        continuations = generate(model, [p.ids for p in share], end_of_text=self.end_of_text,
                                 pad_token_id=self.pad_token_id, max_new_tokens=self.max_new_tokens,
                                 batch_size=self.batch_size, device=device, amp=amp, decoding=self.decoding)
        texts = [t.strip() for t in self.tokenizer.batch_decode(continuations, skip_special_tokens=True)]
        if dist.enabled:  # rank r generated prompts r, r + world_size, ...: interleave them back
            shares = dist.gather(texts)
            texts = [shares[i % dist.world_size][i // dist.world_size] for i in range(len(self.prompts))]
        metrics = score(texts, [p.references for p in self.prompts])
        examples = [{"prompt": p.text, "references": p.references, "generation": text}
                    for p, text in zip(self.prompts[: self.keep], texts)]
        return metrics, examples
