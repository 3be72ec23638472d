"""The registry is the only place families are listed: every record fills the fields other modules read
(objective, width fields, cache-free fields, image processor) with values that hold for its configs, and no
module outside lmzoo/models/ branches on, or keys a table by, a family's name."""

import ast
import dataclasses
from pathlib import Path

import pytest

from lmzoo.errors import ConfigError
from lmzoo.interop.checkpoint import build
from lmzoo.models.registry import families, family_of, get_family
from lmzoo.nn.attention import Attention
from lmzoo.nn.mla import MLA
from lmzoo.objectives import OBJECTIVES
from lmzoo.vision.preprocess import ImageProcessor

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = sorted(families())


@pytest.mark.parametrize("name", FAMILIES)
def test_every_record_fills_the_fields_other_modules_read(name):
    fam = get_family(name)
    assert fam.pretrain_objective in OBJECTIVES
    fields = {f.name for f in dataclasses.fields(fam.config_cls)}
    assert set(fam.width_fields) <= fields and set(fam.cache_free_fields) <= fields, fields
    assert all(isinstance(v, int) and v > 0 for v in fam.cache_free_fields.values())
    assert fam.image_processor is None or isinstance(fam.image_processor, ImageProcessor)
    for cfg in fam.presets.values():
        assert family_of(cfg) is fam


def test_family_of_refuses_a_foreign_config():
    with pytest.raises(ConfigError, match="no registered family's config"):
        family_of(object())


def _per_layer_cache(cfg) -> list[int]:
    model = build(cfg, device="meta")
    return [m.kv_bytes_per_token(1) for m in model.modules() if isinstance(m, (Attention, MLA))]


@pytest.mark.parametrize("name", [n for n in FAMILIES if get_family(n).cache_free_fields])
def test_cache_free_fields_leave_the_cache_unchanged(name):
    """What ``lmzoo kvcache`` relies on: each field, given its small value, is accepted by the config and
    changes nothing any layer caches per token (smallest preset by d_model · layers)."""
    fam = get_family(name)
    cfg = min(fam.presets.values(), key=lambda c: c.d_model * c.n_layers)
    want = _per_layer_cache(cfg)
    assert want and sum(want) > 0
    changed = {f: v for f, v in fam.cache_free_fields.items() if getattr(cfg, f)}
    assert changed, "no cache-free field is set on the preset: the test would check nothing"
    for f, v in changed.items():
        assert _per_layer_cache(cfg.replace(**{f: v})) == want, f
    assert _per_layer_cache(cfg.replace(**changed)) == want


# -- the rule: family names are not keys or branches outside lmzoo/models/ ------------------------

# (file, family name) -> why the string there is not a family branch. An entry that no longer matches
# anything fails the test, so the list cannot rot.
ALLOWED = {
    ("lmzoo/quant/registry.py", "clip"): "AWQ's clipping-search option, not the CLIP family",
    ("lmzoo/tokenizers/chat.py", "chatglm2"): "a chat template's name (the template ChatGLM2 ships)",
    ("lmzoo/tokenizers/chat.py", "chatglm"): "a chat template's name (ChatGLM-6B's chat() prompt)",
    ("lmzoo/tokenizers/loading.py", "gpt2"): "a tokenizer file format: vocab.json + merges.txt",
    ("lmzoo/tokenizers/loading.py", "bert"): "a tokenizer file format: WordPiece vocab.txt",
    ("lmzoo/interop/gguf_vocab.py", "gpt2"): "a GGUF vocabulary type (tokenizer.ggml.model), byte-level BPE",
    ("lmzoo/interop/gguf_vocab.py", "llama"): "a GGUF vocabulary type (tokenizer.ggml.model), SentencePiece",
    ("lmzoo/vision/demo.py", "vit"): "the table of demo runs behind `lmzoo train vit|clip`, by command name",
    ("lmzoo/vision/demo.py", "clip"): "the table of demo runs behind `lmzoo train vit|clip`, by command name",
    # to remove: `args.model == "clip"` picks the extra file to print; the demo run could report its files
}


def _family_strings(tree: ast.AST, names: set[str]):
    """(line, name) of each family-name string used as a dict key, a comparison operand (also inside a
    literal tuple/list/set compared against) or a match-case value. Docstrings, messages, defaults,
    ``choices=`` and lookups such as ``get_family("vit")`` are not flagged: they name, they do not branch."""
    for node in ast.walk(tree):
        found = []
        if isinstance(node, ast.Dict):
            found += [k for k in node.keys if k is not None]
        elif isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                found += list(side.elts) if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
        elif isinstance(node, ast.MatchValue):
            found.append(node.value)
        for c in found:
            if isinstance(c, ast.Constant) and isinstance(c.value, str) and c.value in names:
                yield c.lineno, c.value


def test_no_family_names_as_keys_or_branches_outside_models():
    names = set(families())
    hits = {}
    for path in sorted((ROOT / "lmzoo").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("lmzoo/models/"):
            continue
        for line, name in _family_strings(ast.parse(path.read_text(), rel), names):
            hits.setdefault((rel, name), []).append(line)
    bad = {f"{rel}:{lines[0]} '{name}'" for (rel, name), lines in hits.items() if (rel, name) not in ALLOWED}
    assert not bad, ("family knowledge outside the registry (move it into the family's record or a block): "
                     f"{sorted(bad)}")
    stale = set(ALLOWED) - set(hits)
    assert not stale, f"ALLOWED entries that match nothing any more, remove them: {sorted(stale)}"


def test_the_scan_sees_a_branch():
    src = 'if fam.name == "bert":\n    x = {"vit": 1}\nok = get_family("llama")\n"""about t5"""\n'
    assert sorted(_family_strings(ast.parse(src), {"bert", "vit", "llama", "t5"})) == [(1, "bert"), (2, "vit")]
