"""Tiny models and byte-level text for demos, tests and benchmarks (nothing is downloaded).

Models are built from a config with a fixed seed; text is tokenised as raw UTF-8 bytes, so no
tokenizer has to be trained or fetched. ``transformers`` and ``datasets`` are imported lazily.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "PAD_ID",
    "VOCAB_SIZE",
    "byte_dataset",
    "byte_tokenizer",
    "check_evaluation_split",
    "collate_causal",
    "default_data_dir",
    "encode_bytes",
    "encode_instruction",
    "instruct_dataset",
    "INSTRUCTION_FIELDS",
    "load_jsonl",
    "load_jsonl_dir",
    "per_domain_loss",
    "task_losses",
    "text_split",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_llava",
]

#: The fields every record of a text corpus (textmix's layout) and of an instruction pool must have.
TEXT_FIELDS = ("text", "domain")
INSTRUCTION_FIELDS = ("instruction", "response", "task")

PAD_ID = 256  # byte values are 0..255; one extra id pads and ends sequences
VOCAB_SIZE = 257


def default_data_dir() -> Path:
    """``$DATAFLEX_DATA`` if set, else the ``data/`` folder bundled with the repository."""
    env = os.environ.get("DATAFLEX_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "data"


def text_split(folder: str | os.PathLike[str], max_len: int, max_per_file: int | None = None) -> Any:
    """One split of a text corpus laid out as ``data/textmix`` (``<folder>/*.jsonl``, records with ``text`` and
    ``domain``) as a :func:`byte_dataset`: the first ``max_per_file`` records of each file, every one checked."""
    return byte_dataset(load_jsonl_dir(folder, max_per_file, require=TEXT_FIELDS), max_len)


def load_jsonl_dir(
    folder: str | os.PathLike[str], max_per_file: int | None = None, require: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """Read every ``*.jsonl`` in ``folder`` (sorted by name) with :func:`load_jsonl`, keeping the first
    ``max_per_file`` records of each; each must have the fields in ``require``."""
    folder = Path(folder)
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no .jsonl files in {folder}")
    return [record for path in files for record in load_jsonl(path, max_per_file, require)]


def load_jsonl(
    path: str | os.PathLike[str], max_records: int | None = None, require: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """The records (JSON objects, one per line) of a ``.jsonl`` file, the first ``max_records`` of them.

    Blank lines are skipped (a trailing empty line is common); a line that is not a JSON object, or one without
    a field in ``require``, raises naming its file and line number, since a record silently lost or mis-read
    would change the data trained on.
    """
    records: list[dict[str, Any]] = []
    with open(path, "rb") as f:  # bytes, decoded line by line: a bad byte is reported with its line number
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig")  # -sig: a byte-order mark some editors write is not JSON
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{number} is not UTF-8 text ({error.reason} at byte {error.start})") from None
            if max_records is not None and len(records) >= max_records:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not valid JSON ({error.msg}): {line[:80]!r}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number} is a JSON {type(record).__name__}, not an object (a record)")
            missing = [field for field in require if field not in record]
            if missing:
                example = ", ".join(f'"{field}": ...' for field in require)
                raise ValueError(
                    f"{path}:{number} has no {', '.join(map(repr, missing))} field: every record here needs "
                    f"{list(require)} ({{{example}}} on each line); fields it has: {sorted(record)}"
                )
            records.append(record)
    return records


def encode_bytes(text: str, max_len: int) -> list[int]:
    """UTF-8 bytes of ``text`` followed by the end id, cut to ``max_len`` tokens."""
    return (list(text.encode("utf-8")) + [PAD_ID])[:max_len]


def byte_dataset(records: Sequence[dict[str, Any]], max_len: int, text_key: str = "text") -> Any:
    """A ``datasets.Dataset`` with ``input_ids`` and every other field of the records kept.

    Every record must have the text and the fields of the first record (a ``domain`` label missing from
    one record would otherwise stop the run with a bare ``KeyError``, or, for a text that is not a string,
    train on its ``repr``)."""
    from datasets import Dataset

    if not records:
        raise ValueError("no records to build a dataset from")
    keys = [key for key in records[0] if key != text_key]
    for i, record in enumerate(records):
        missing = [key for key in (text_key, *keys) if key not in record]
        if missing:
            raise ValueError(f"record {i} has no {missing} (every record needs {[text_key, *keys]}): {record!r:.120}")
        if not isinstance(record[text_key], str):
            raise ValueError(
                f"record {i}'s {text_key!r} is {type(record[text_key]).__name__}, not text: {record!r:.120}"
            )
    rows = {key: [r[key] for r in records] for key in keys}
    for key, values in rows.items():  # Arrow needs one type per column; name the field instead of its error
        kinds: dict[str, int] = {}
        for i, value in enumerate(values):
            if value is not None:
                kinds.setdefault(type(value).__name__, i)
        if len(kinds) > 1:
            raise ValueError(
                f"field {key!r} holds values of several types (first record of each: {kinds}); give it one type"
            )
    rows["input_ids"] = [encode_bytes(r[text_key], max_len) for r in records]
    return Dataset.from_dict(rows)


def encode_instruction(instruction: str, response: str, max_len: int, min_prompt: int = 32) -> tuple[list[int], int]:
    """``instruction + "\nAnswer: " + response + end`` as bytes, and the prompt's length.

    When too long, the response keeps its start (at most ``max_len - min_prompt`` tokens) and the
    prompt keeps its *end* (the question and the answer cue), so the loss always has response tokens.
    """
    prompt = list((instruction + "\nAnswer: ").encode("utf-8"))
    reply = (list(response.encode("utf-8")) + [PAD_ID])[: max(1, max_len - min_prompt)]
    prompt = prompt[-(max_len - len(reply)) :] if len(prompt) + len(reply) > max_len else prompt
    return prompt + reply, len(prompt)


def instruct_dataset(records: Sequence[dict[str, Any]], max_len: int) -> Any:
    """A ``datasets.Dataset`` of instruction/response records: ``input_ids``, ``prompt_len`` and ``task``.

    :func:`collate_causal` masks the prompt, so losses count response tokens only.
    """
    from datasets import Dataset

    for i, record in enumerate(records):
        missing = [k for k in ("instruction", "response", "task") if k not in record]
        if missing:
            raise ValueError(
                f"instruction records need 'instruction', 'response' and 'task'; record {i} has no {missing}: "
                f"{record!r:.120}"
            )
    encoded = [encode_instruction(r["instruction"], r["response"], max_len) for r in records]
    return Dataset.from_dict(
        {
            "input_ids": [e[0] for e in encoded],
            "prompt_len": [e[1] for e in encoded],
            "task": [r["task"] for r in records],
        }
    )


def collate_causal(features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids``; labels are the inputs with padding (and a ``prompt_len`` prefix) set to -100.

    An example's own ``labels`` list, when present, is used instead (padded with -100).
    """
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        row = torch.as_tensor(f["input_ids"], dtype=torch.long)
        ids[i, : row.numel()] = row
        mask[i, : row.numel()] = 1
    labels = ids.masked_fill(mask == 0, -100)
    for i, f in enumerate(features):
        if f.get("labels") is not None:  # given labels win (they survive the Trainer's remove_unused_columns)
            row = torch.as_tensor(f["labels"], dtype=torch.long)
            labels[i] = -100
            labels[i, : row.numel()] = row
        elif "prompt_len" in f:  # instruction tuning: only the response is learnt and scored
            labels[i, : int(f["prompt_len"])] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def byte_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` for the byte vocabulary (ids 0..255, pad/eos 256), built locally.

    Text is encoded as its UTF-8 bytes, exactly as :func:`encode_bytes` does (``"é"`` -> ``[195, 169]``), so
    trainers that tokenize text themselves (TRL's prompt-completion and preference data) see the same ids as
    the byte datasets; decoding inverts it. ``<pad>`` is the pad and end-of-sequence token.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # ByteLevel maps each byte to one printable character (GPT-2's table); splitting into single characters
    # then gives one token per byte, whose id is the byte's value.
    vocab = {char: byte for byte, char in bytes_to_unicode().items()} | {"<pad>": PAD_ID}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            pre_tokenizers.Split(Regex("."), behavior="isolated"),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<pad>")


def _seeded(model_cls: Any, config: Any, seed: int) -> Any:
    """Build ``model_cls(config)`` with weights drawn from ``seed``, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(config)


def tiny_gpt2(
    *, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_positions: int = 256, seed: int = 0, dropout: float = 0.0
) -> Any:
    """A GPT-2 of a few hundred thousand parameters over the byte vocabulary, initialised from ``seed``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=PAD_ID,
        eos_token_id=PAD_ID,
        pad_token_id=PAD_ID,
    )
    return _seeded(GPT2LMHeadModel, config, seed)


def tiny_llama(*, n_layer: int = 2, hidden: int = 64, n_head: int = 4, n_positions: int = 256, seed: int = 0) -> Any:
    """A Llama-architecture causal LM (RoPE, RMSNorm, SwiGLU) over the byte vocabulary."""
    from transformers import LlamaForCausalLM

    return _seeded(LlamaForCausalLM, _llama_config(VOCAB_SIZE, hidden, n_layer, n_head, n_positions), seed)


def _llama_config(vocab_size: int, hidden: int, n_layer: int, n_head: int, n_positions: int) -> Any:
    """The small Llama text config shared by :func:`tiny_llama` and the LM of :func:`tiny_llava`."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_head,
        max_position_embeddings=n_positions,
        bos_token_id=PAD_ID,
        eos_token_id=PAD_ID,
        pad_token_id=PAD_ID,
    )


def tiny_llava(
    *,
    image_size: int = 16,
    patch_size: int = 4,
    channels: int = 1,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    hidden: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_positions: int = 128,
    seed: int = 0,
) -> Any:
    """A LLaVA-style VLM: CLIP vision tower -> 2-layer GELU projector -> Llama LM over bytes + an image token.

    Built from ``LlavaConfig`` (arXiv 2304.08485's architecture), nothing downloaded. With the default
    ``vision_feature_select_strategy="default"`` the CLS patch is dropped, so an image fills
    ``(image_size // patch_size) ** 2`` image-token positions of the text (16 by default).
    """
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from dataflex.testbeds.digits import IMAGE_TOKEN_ID, VLM_VOCAB_SIZE

    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=n_head,
        image_size=image_size,
        patch_size=patch_size,
        num_channels=channels,
    )
    text = _llama_config(VLM_VOCAB_SIZE, hidden, n_layer, n_head, n_positions)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    return _seeded(LlavaForConditionalGeneration, config, seed)


@torch.no_grad()
def per_domain_loss(model: Any, dataset: Any, domains: Sequence[str], batch_size: int = 32) -> dict[str, float]:
    """Token-mean loss per domain (tokens pooled within a domain), in eval mode."""
    from dataflex.losses import per_example_token_loss
    from dataflex.modes import eval_mode

    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    with eval_mode(model):
        for start in range(0, len(dataset), batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) for k, v in collate_causal(rows).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, valid = per_example_token_loss(logits, batch["labels"])
            tokens = (batch["labels"][:, 1:] != -100).sum(1)
            for j, dom in enumerate(domains[start : start + len(rows)]):
                if bool(valid[j]):
                    sums[dom] = sums.get(dom, 0.0) + float(loss[j]) * int(tokens[j])
                    counts[dom] = counts.get(dom, 0) + int(tokens[j])
    unscored = sorted(set(domains) - {d for d, n in counts.items() if n > 0}, key=str)
    if unscored:
        raise ValueError(_unscored_message(unscored))
    return {d: sums[d] / counts[d] for d in sorted(sums)}


def _unscored_message(domains: Sequence[Any]) -> str:
    return (
        f"domains {list(domains)} have no token to score (every example is empty or one token long, or fully "
        "masked): their loss cannot be measured, and a mean over domains would silently leave them out; give "
        "them text or remove them from the split"
    )


def check_evaluation_split(train_ds: Any, eval_ds: Any, split: str = "validation", column: str = "domain") -> None:
    """Check an evaluation split before training, so a run does not end in a table that is wrong or missing.

    Raises when a domain has no example with a next-token target (its loss could not be measured; the
    per-domain table would leave it out of the mean silently); warns, naming them, for evaluated domains
    that no training example has (out-of-domain evaluation is legitimate, but a misspelt domain name looks
    the same) and for training domains the split does not evaluate (the table would leave them out)."""
    import warnings

    domains = list(eval_ds[column])
    scorable = {d for d, ids in zip(domains, eval_ds["input_ids"]) if len(ids) >= 2}
    unscored = sorted(set(domains) - scorable, key=str)
    if unscored:
        raise ValueError(f"the {split} split: " + _unscored_message(unscored))
    unseen = sorted(set(domains) - set(train_ds[column]), key=str)
    if unseen:
        warnings.warn(
            f"the {split} split has domains {unseen} that no training example has: they are evaluated, but no "
            f"training weight reaches them (training domains: {sorted(set(train_ds[column]), key=str)})",
            stacklevel=2,
        )
    unevaluated = sorted(set(train_ds[column]) - set(domains), key=str)
    if unevaluated:
        warnings.warn(
            f"training domains {unevaluated} have no example in the {split} split: the per-domain table, its mean "
            "and its worst domain leave them out, so a mixture that starves them would not show; add "
            f"{split} examples for them if their loss matters",
            stacklevel=2,
        )


def task_losses(model: Any, sets: dict[str, Any], batch_size: int = 32) -> dict[str, float]:
    """Per task: the mean over its examples of the token-mean loss on response bytes (each example counts
    once, whatever its length; :func:`per_domain_loss` pools tokens instead)."""
    import numpy as np

    from dataflex.offline import score_pool, token_mean_losses

    scorer = token_mean_losses(model)
    return {
        task: float(np.nanmean(score_pool(scorer, ds, collate_causal, batch_size=batch_size, progress=False)))
        for task, ds in sets.items()
    }
