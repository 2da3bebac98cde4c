"""The text mode's training encoders: a frozen pretrained encoder takes its tokenizer from --tokenizer_name_or_path
when given (a Stable-Diffusion-layout folder keeps it in tokenizer/, apart from text_encoder/)."""

import json
from types import SimpleNamespace

import torch
from helpers.training import stage2_args
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm_diffusers import LDMPipeline
from ldm_diffusers.conditioning import TextMode, bert_tokenizer, load_frozen_text_encoder, minilm_path
from ldm_diffusers.training.latent_diffusion import main as train_main


def test_frozen_encoder_takes_the_tokenizer_it_is_given(tmp_path):
    tokenizer = bert_tokenizer()
    tokenizer.add_tokens(["<emoji-only-token>"])
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    args = SimpleNamespace(text_encoder="frozen", text_encoder_name_or_path=minilm_path(), max_prompt_length=16,
                           tokenizer_name_or_path=str(tmp_path / "tokenizer"), text_encoder_subfolder=None)
    parts = TextMode().build_encoders(args, None, None)
    assert "<emoji-only-token>" in parts.frozen["tokenizer"].get_vocab()
    assert parts.frozen["tokenizer"].model_max_length == 16 and "text_encoder" in parts.frozen
    args.tokenizer_name_or_path = None  # without one: the encoder's own (MiniLM's BERT WordPiece)
    assert "<emoji-only-token>" not in TextMode().build_encoders(args, None, None).frozen["tokenizer"].get_vocab()


def tiny_clip_pipeline_folder(root):
    """A Stable-Diffusion-layout folder: a tiny CLIP text encoder in text_encoder/, its tokenizer in tokenizer/
    (a character-level BPE vocabulary: no merges)."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in letters + [c + "</w>" for c in letters]:
        vocab[token] = len(vocab)
    (root / "vocab").mkdir(parents=True)
    (root / "vocab" / "vocab.json").write_text(json.dumps(vocab))
    (root / "vocab" / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(root / "vocab" / "vocab.json"), str(root / "vocab" / "merges.txt"))
    tokenizer.save_pretrained(root / "clip" / "tokenizer")
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(root / "clip" / "text_encoder")
    return root / "clip"


def test_frozen_clip_from_a_stable_diffusion_layout_folder_trains_and_samples(stage1, emoji16_tiny, tmp_path,
                                                                              fresh_accelerate_state):
    folder = tiny_clip_pipeline_folder(tmp_path)
    tokenizer, encoder = load_frozen_text_encoder(str(folder))
    assert isinstance(tokenizer, CLIPTokenizer) and isinstance(encoder, CLIPTextModel)
    assert not any(p.requires_grad for p in encoder.parameters())
    # a tokenizer given apart wins over the folder's own
    bert_tokenizer().save_pretrained(tmp_path / "bert")
    assert not isinstance(load_frozen_text_encoder(str(folder), str(tmp_path / "bert"))[0], CLIPTokenizer)
    out = tmp_path / "run"
    train_main(stage2_args(stage1, emoji16_tiny, out, "--text_encoder", "frozen", "--text_encoder_name_or_path",
                           str(folder), "--max_train_steps", "1"))
    pipe = LDMPipeline.from_pretrained(out)
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel" and type(pipe.tokenizer).__name__ == "CLIPTokenizer"
    assert pipe.unet.config.cross_attention_dim == 32
    pipe.set_progress_bar_config(disable=True)
    image = pipe("an emoji of a cat", num_inference_steps=1, output_type="np").images
    assert image.shape == (1, 16, 16, 3)


def test_frozen_clip_from_a_hub_pipeline_with_a_subfolder(local_hub, tmp_path):
    local_hub.publish(tiny_clip_pipeline_folder(tmp_path), "org/tiny-sd")
    args = SimpleNamespace(text_encoder="frozen", text_encoder_name_or_path="org/tiny-sd", max_prompt_length=12,
                           tokenizer_name_or_path=None, text_encoder_subfolder="text_encoder")
    parts = TextMode().build_encoders(args, None, None)
    assert isinstance(parts.frozen["tokenizer"], CLIPTokenizer) and isinstance(parts.frozen["text_encoder"], CLIPTextModel)
    assert parts.context_dim == 32
