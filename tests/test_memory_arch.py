"""memory.arch: exact parameter counts per family (against the meta-device build), loading, saved activations."""
import json

import pytest
import torch

from memory.arch import (
    arch_from_config,
    builtin_config,
    builtin_names,
    count_params,
    layer_saved,
    load_arch,
    meta_count,
    nograd_layer_bytes,
)

# one real-size model per family plus the variants that change the count (tied/untied, GQA, qkv bias,
# OPT's projected embeddings, Gemma-2's four norms and explicit head_dim)
FAMILY_MODELS = ["gpt2", "opt-125m", "opt-350m", "opt-13b", "Qwen2.5-0.5B", "Qwen2.5-3B", "Qwen2.5-7B", "Qwen2.5-14B",
                 "Qwen2.5-32B", "Llama-3-8B", "Mistral-7B", "Gemma-2-9B"]


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_parameter_count_equals_the_meta_device_count(name):
    cfg = builtin_config(name)
    analytic = count_params(cfg)
    total, largest = meta_count(cfg)
    assert analytic["params"] == total
    assert analytic["largest_param"] == largest


def test_gpt2_config_with_transformers_common_names_counts_exactly():
    """GPT2Config accepts hidden_size / num_hidden_layers / max_position_embeddings for its own n_* names; a
    config written that way has as many learned positions as it says (the count once assumed 1024)."""
    cfg = {"model_type": "gpt2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "vocab_size": 300, "max_position_embeddings": 2048}
    assert count_params(cfg)["params"] == meta_count(cfg)[0]


def test_large_models_counted_exactly_and_without_torch_at_plan_time():
    """70B-class models come from the table analytically; their meta count agrees too (one build each)."""
    for name in ("Llama-3-70B", "Qwen2.5-72B"):
        cfg = builtin_config(name)
        assert count_params(cfg)["params"] == meta_count(cfg)[0]
    assert load_arch("Llama-3-70B").params == 70_553_706_496


def test_builtin_table_has_the_issue_models_with_sources():
    names = set(builtin_names())
    assert {"Llama-3-8B", "Llama-3-70B", "Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen2.5-7B", "Qwen2.5-72B", "Mistral-7B",
            "Gemma-2-9B", "gpt2", "opt-1.3b"} <= names
    from memory.arch import builtin_table

    assert all(entry["source"] for entry in builtin_table()["models"].values())
    assert load_arch("Qwen/Qwen2.5-7B-Instruct").params == load_arch("qwen2.5-7b").params


def test_untied_qwen2_matches_its_published_count():
    """DeepSeek-R1-Distill-Qwen-1.5B: Qwen2.5-1.5B's shape with its own LM head; a saved copy's safetensors index
    states total_parameters 1777088000 (memory/model_configs.json names it)."""
    cfg = builtin_config("DeepSeek-R1-Distill-Qwen-1.5B")
    assert load_arch("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B").params == 1_777_088_000 == meta_count(cfg)[0]
    assert load_arch("DeepSeek-R1-Distill-Qwen-1.5B").params - load_arch("Qwen2.5-1.5B").params == 151936 * 1536


def test_shapes_gqa_tied_and_kv_bytes():
    q = load_arch("Qwen2.5-7B")
    assert (q.kv_heads, q.head_dim, q.kv_dim, q.tied) == (4, 128, 512, False)
    assert q.kv_bytes_per_token(2) == 2 * 28 * 512 * 2  # 57344 B/token: K and V of 28 layers, 4 KV heads
    small = load_arch("Qwen2.5-0.5B")
    assert small.tied and small.head_params == 0
    g = load_arch("Gemma-2-9B")
    assert g.q_dim == 16 * 256 != g.hidden  # explicit head_dim
    assert load_arch("Llama-3-8B").layers * load_arch("Llama-3-8B").layer_params + load_arch("Llama-3-8B").root_params \
        == load_arch("Llama-3-8B").params


def test_config_path_folder_and_unknown_family(tmp_path):
    cfg = dict(builtin_config("Mistral-7B"), num_hidden_layers=2)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    a, b = load_arch(str(tmp_path / "config.json")), load_arch(str(tmp_path))
    assert a.params == b.params == meta_count(cfg)[0]
    # a family the analytic counter does not know falls back to the meta-device count
    phi = {"model_type": "phi3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 300, "pad_token_id": 0}
    assert arch_from_config(phi).params == meta_count(phi)[0]
    with pytest.raises(ValueError, match="unknown model"):
        load_arch("no-such-model")
    (tmp_path / "bad.json").write_text("[1]")
    with pytest.raises(ValueError, match="not a JSON object"):
        load_arch(str(tmp_path / "bad.json"))


def _saved_storage_bytes(model, input_ids) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for backward in one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=input_ids, use_cache=False)
    return sum(seen.values())


@pytest.mark.parametrize("family,attn,trained_norms", [
    ("llama", "flash", True), ("llama", "eager", True), ("gpt2", "flash", True), ("gpt2", "eager", True),
    ("opt", "flash", True), ("opt", "eager", True), ("gemma2", "eager", True),
    # LoRA freezes the norms (the linear layers' inputs stay saved: their adapters need them)
    ("llama", "flash", False), ("gemma2", "eager", False), ("opt", "flash", False)])
def test_layer_saved_matches_what_autograd_saves(family, attn, trained_norms):
    """Count the distinct non-parameter storages autograd saves in one decoder layer (two-layer minus
    one-layer model) and compare with the per-token formula."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = {"llama": dict(model_type="llama", hidden_size=64, intermediate_size=176, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=300),
            "gpt2": dict(model_type="gpt2", n_embd=64, n_inner=176, n_head=4, vocab_size=300, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0),
            "opt": dict(model_type="opt", hidden_size=64, ffn_dim=176, num_attention_heads=4, vocab_size=300,
                        word_embed_proj_dim=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0),
            "gemma2": dict(model_type="gemma2", hidden_size=64, intermediate_size=176, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=24, vocab_size=300)}[family]
    layers_key = "n_layer" if family == "gpt2" else "num_hidden_layers"
    b, s = 2, 12

    def saved_bytes(layers):
        cfg = dict(base, **{layers_key: layers})
        mt = cfg.pop("model_type")
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(AutoConfig.for_model(mt, **cfg), dtype=torch.bfloat16,
                                             attn_implementation="sdpa" if attn == "flash" else attn).train()
        for name, p in m.named_parameters():
            if not trained_norms and "norm" in name:
                p.requires_grad_(False)
        return _saved_storage_bytes(m, torch.randint(0, 300, (b, s)))

    measured = saved_bytes(2) - saved_bytes(1)
    cfg = dict(base, **{layers_key: 1})
    predicted = layer_saved(arch_from_config(cfg), attn, s, trained_norms).bytes(2) * b * s
    assert predicted == pytest.approx(measured, rel=0.02), (measured, predicted)


def test_nograd_layer_refuses_an_unknown_attention_implementation():
    with pytest.raises(ValueError, match="unknown attention implementation 'xformers'"):
        nograd_layer_bytes(load_arch("Qwen2.5-0.5B"), "xformers", 128, 2)


@pytest.mark.parametrize("family,attn", [("llama", "flash"), ("llama", "eager"), ("qwen2", "flash")])
def test_layer_saved_under_autocast_matches_what_autograd_saves(family, attn):
    """fp32 parameters under CPU autocast to bf16 (AMP): one decoder layer's saved storages (two-layer minus
    one-layer model), split into what grows with the tokens (two token counts) and what does not (the weights'
    bf16 cast copies, autocast_casts), against layer_saved(autocast=True)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from memory.deploy import Deployment, Role, autocast_casts

    base = dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=300)

    def saved_bytes(layers, b, s):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, num_hidden_layers=layers, **base),
                                             dtype=torch.float32, attn_implementation="sdpa" if attn == "flash"
                                             else attn).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _saved_storage_bytes(m, torch.randint(0, 300, (b, s)))

    b, s = 2, 12
    layer = {n: saved_bytes(2, b, n) - saved_bytes(1, b, n) for n in (s, 2 * s)}
    arch = arch_from_config({"model_type": family, "num_hidden_layers": 1, **base})
    fixed = autocast_casts(Role("actor", arch, trained=True, dtype_bytes=4),
                           Deployment(actor=Role("actor", arch, trained=True), autocast_bytes=2))
    for n, measured in layer.items():
        predicted = layer_saved(arch, attn, n, autocast=True).bytes(2) * b * n + fixed
        assert predicted == pytest.approx(measured, rel=0.02), (n, measured, predicted)
