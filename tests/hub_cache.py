"""A Hugging Face Hub cache laid out the way huggingface_hub writes it (its documented layout:
``models--org--name/refs/<branch>`` holding a commit hash, ``snapshots/<commit>/<file>`` a relative link
into ``blobs/``), holding tiny models that transformers and PEFT saved: the offline ground for the tests
of Hub ids (lmzoo/interop/hub.py). ``tests/interop/test_hub.py`` checks the layout with huggingface_hub's
own cache scanner.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

MAIN = hashlib.sha1(b"lmzoo test main").hexdigest()  # 40 hex digits, as a git commit
DEV = hashlib.sha1(b"lmzoo test dev").hexdigest()
IDS = torch.tensor([[5, 17, 42, 3, 99, 7]])


@dataclass
class HubRepos:
    home: Path  # HF_HOME
    cache: Path  # HF_HUB_CACHE = HF_HOME/hub
    source: dict[str, Path] = field(default_factory=dict)  # the folders cached: "main", "dev", "adapter"
    logits: dict[str, torch.Tensor] = field(default_factory=dict)  # transformers' (and PEFT's) logits on IDS


def cache_repo(cache: Path, repo_id: str, files: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put every file of the folder ``files`` into ``cache`` as ``repo_id`` at ``commit`` (blobs named by
    their sha256, as LFS files are; snapshot entries link to them); each ref names the commit. The snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(files.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


def tiny_tokenizer():
    """A byte-level BPE in transformers' fast-tokenizer wrapper (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world, hello lmzoo", "床前明月光，疑是地上霜。"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_llama(vocab_size: int, seed: int):
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                        initializer_range=0.1, bos_token_id=0, eos_token_id=1)
    return T.LlamaForCausalLM(cfg).eval()


def build(root: Path) -> HubRepos:
    """``org/name`` at main (seed 0) and at the branch dev (seed 1), ``org/adapter`` (a PEFT LoRA on main's
    model), ``org/pickled`` (config.json and a pytorch_model.bin only)."""
    import peft

    repos = HubRepos(home=root / "hf_home", cache=root / "hf_home" / "hub")
    tok = tiny_tokenizer()
    for rev, commit, seed in (("main", MAIN, 0), ("dev", DEV, 1)):
        model = tiny_llama(len(tok), seed)
        d = root / "saved" / rev
        model.save_pretrained(d)
        tok.save_pretrained(d)
        with torch.no_grad():
            repos.logits[rev] = model(IDS).logits
        repos.source[rev] = d
        cache_repo(repos.cache, "org/name", d, commit, refs=(rev,))
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                           task_type="CAUSAL_LM")  # B random, not zero: the adapter moves the logits
    torch.manual_seed(2)
    pm = peft.get_peft_model(tiny_llama(len(tok), 0), lora).eval()
    pm.save_pretrained(root / "saved" / "adapter")
    repos.source["adapter"] = root / "saved" / "adapter"
    with torch.no_grad():
        repos.logits["adapter"] = pm(IDS).logits
    cache_repo(repos.cache, "org/adapter", root / "saved" / "adapter", hashlib.sha1(b"adapter").hexdigest())
    pickled = root / "saved" / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((repos.source["main"] / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    cache_repo(repos.cache, "org/pickled", pickled, hashlib.sha1(b"pickled").hexdigest())
    return repos
