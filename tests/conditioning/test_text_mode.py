"""The text mode's training encoders: a frozen pretrained encoder takes its tokenizer from --tokenizer_name_or_path
when given (a Stable-Diffusion-layout folder keeps it in tokenizer/, apart from text_encoder/)."""

from types import SimpleNamespace

from ldm_diffusers.conditioning import TextMode, bert_tokenizer, minilm_path


def test_frozen_encoder_takes_the_tokenizer_it_is_given(tmp_path):
    tokenizer = bert_tokenizer()
    tokenizer.add_tokens(["<emoji-only-token>"])
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    args = SimpleNamespace(text_encoder="frozen", text_encoder_name_or_path=minilm_path(), max_prompt_length=16,
                           tokenizer_name_or_path=str(tmp_path / "tokenizer"))
    parts = TextMode().build_encoders(args, None, None)
    assert "<emoji-only-token>" in parts.frozen["tokenizer"].get_vocab()
    assert parts.frozen["tokenizer"].model_max_length == 16 and "text_encoder" in parts.frozen
    args.tokenizer_name_or_path = None  # without one: the encoder's own (MiniLM's BERT WordPiece)
    assert "<emoji-only-token>" not in TextMode().build_encoders(args, None, None).frozen["tokenizer"].get_vocab()
