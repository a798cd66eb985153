"""The default model, built locally and deterministically: no download at run time.

A GPT-2 shaped like ``sshleifer/tiny-gpt2`` (2 layers, 2 heads; width 64 here so it can learn a little) and a
byte-level BPE tokenizer trained on a corpus generated from fixed word lists. The same seed gives the same
vocabulary and weights on any machine with the same torch; both are saved with ``save_pretrained`` so every
path, ours and TRL's, loads them with ``from_pretrained``.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

BUILDER_VERSION = 2  # 2: the saved tokenizer keeps padding_side="left" and model_max_length = n_positions
DEFAULT_SEED = 0
EOS = "<|endoftext|>"

TINY_CONFIG = dict(n_layer=2, n_head=2, n_embd=64, n_positions=256, vocab_size=1024)

_SUBJECTS = ["the movie", "this book", "the food", "our trip", "the weather", "my day", "the game", "the service",
             "the music", "the story", "this place", "the team", "the show", "the hotel", "the city", "the coffee",
             "the new phone", "the class", "the concert", "the garden"]
_VERBS = ["was", "is", "seemed", "felt", "looked", "turned out", "became", "sounds", "remains", "tastes"]
_POSITIVE = ["good", "great", "happy", "wonderful", "excellent", "amazing", "love", "nice", "fantastic", "best",
             "beautiful", "fun", "delightful", "brilliant", "perfect", "enjoyable", "pleasant", "awesome"]
_NEGATIVE = ["bad", "terrible", "sad", "awful", "horrible", "worst", "boring", "poor", "hate", "ugly", "dull",
             "annoying", "disappointing", "broken", "slow", "painful"]
_NEUTRAL = ["okay", "long", "short", "different", "quiet", "busy", "early", "late", "simple", "big", "small", "new",
            "old", "warm", "cold", "fine"]
_ENDINGS = ["and i loved it.", "and it was great.", "thank you.", "have a nice day.", "the end.",
            "see you soon.", "and that is all.", "what a day!", "i would go again.", "not for me."]
_OPENERS = ["i think", "honestly", "today", "yesterday", "in the end", "at first", "overall", "to be fair",
            "my friend said", "everyone agreed", "once upon a time", "the review says"]
_FILLER = ["we", "they", "you", "she", "he", "it", "people", "a friend", "the kids", "my family", "there", "here",
           "very", "really", "quite", "so", "too", "not", "also", "always", "never", "sometimes", "then", "because",
           "but", "and", "or", "with", "without", "for", "about", "after", "before", "during", "again"]


def corpus(seed: int = DEFAULT_SEED, n_sentences: int = 4000) -> list[str]:
    """Deterministic training text for the tokenizer: prompts, sentiment words and phrase endings."""
    rng = random.Random(seed)
    adjectives = _POSITIVE + _NEGATIVE + _NEUTRAL
    lines = []
    for _ in range(n_sentences):
        parts = [rng.choice(_OPENERS), rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(adjectives)]
        parts += rng.sample(_FILLER, k=rng.randint(0, 4))
        parts.append(rng.choice(_ENDINGS))
        sentence = " ".join(parts)
        lines.append(sentence.capitalize() if rng.random() < 0.5 else sentence)
    return lines


def _fingerprint(seed: int) -> str:
    spec = json.dumps({"v": BUILDER_VERSION, "seed": seed, "cfg": TINY_CONFIG}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("RLHFKIT_HOME", Path.home() / ".cache" / "rlhfkit"))


def build_tokenizer(seed: int = DEFAULT_SEED, vocab_size: int = TINY_CONFIG["vocab_size"]):
    """A byte-level BPE (GPT-2 style) trained on :func:`corpus`, wrapped as ``GPT2Tokenizer`` (in transformers 5
    the tokenizers-backed class; ``GPT2TokenizerFast`` is an alias of it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    # as constructor arguments both are saved in tokenizer_config.json: a reload pads on the left, as batched
    # generation needs, and knows the model's context length instead of transformers' 1e30 placeholder
    return GPT2Tokenizer(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS,
                         padding_side="left", model_max_length=TINY_CONFIG["n_positions"])


def build_model(tokenizer, seed: int = DEFAULT_SEED):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg: dict[str, Any] = dict(TINY_CONFIG)
    cfg["vocab_size"] = len(tokenizer)
    config = GPT2Config(
        **cfg, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_tiny_gpt2(path: str | os.PathLike, seed: int = DEFAULT_SEED) -> Path:
    """Build the tiny model and tokenizer into ``path`` (replaced if present)."""
    path = Path(path)
    tokenizer = build_tokenizer(seed)
    model = build_model(tokenizer, seed)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    (path / "rlhfkit_tiny.json").write_text(json.dumps({"builder_version": BUILDER_VERSION, "seed": seed}))
    return path


def tiny_model_path(seed: int = DEFAULT_SEED) -> Path:
    """Folder of the tiny model for ``seed``, built on first use (safe under concurrent callers)."""
    target = cache_root() / "models" / f"tiny-gpt2-{_fingerprint(seed)}"
    if (target / "rlhfkit_tiny.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
    try:
        build_tiny_gpt2(tmp, seed)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is identical
            if not (target / "rlhfkit_tiny.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_tiny(name_or_path: str | None) -> bool:
    return name_or_path in (None, "", "tiny", "tiny-gpt2")


def resolve_model_path(name_or_path: str | None, seed: int = DEFAULT_SEED) -> str:
    """``tiny``/None → the locally built model; anything else is passed to ``from_pretrained`` as is."""
    return str(tiny_model_path(seed)) if is_tiny(name_or_path) else str(name_or_path)
