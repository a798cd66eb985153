"""The tiny model's saved tokenizer reloads ready for batched generation: left padding, the model's length."""
from transformers import AutoConfig, AutoTokenizer


def test_saved_tokenizer_pads_left_and_knows_the_context_length(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.padding_side == "left"
    assert tok.model_max_length == AutoConfig.from_pretrained(tiny_model_dir).n_positions == 256
    enc = tok(["The movie was", "Honestly the food was very good and"], padding=True)
    assert enc["attention_mask"][0][0] == 0 and enc["attention_mask"][0][-1] == 1  # pads before the prompt
    long = tok(["word " * 400], truncation=True)["input_ids"][0]
    assert len(long) == 256
