"""Shikra-7B (image-to-text): cosine of the projected CLIP patch features and LLaMA class features (reference §3.6).

Shikra is LLaVA-v0 shaped: a CLIP ViT-L/14 vision tower, one Linear projector (1024 -> 4096) and LLaMA-7B.
Image feature = the vision tower's hidden state at Shikra's configured layer (mm_vision_select_layer = -2, the
penultimate; the official extractor read the last), patch tokens only (CLS dropped) -> projector -> mean.
Class feature = LLaMA's last hidden state (after the final norm) averaged over the prompt's real tokens.

Shikra has no transformers checkpoint on the hub, only a delta over LLaMA-7B: `transagent agents convert shikra`
(extract/convert/shikra.py) writes the local directory this agent loads (`--agent-path shikra=DIR`).
"""
from __future__ import annotations

from pathlib import Path

from extract.agents.base import AgentSpec, LoadRequest
from extract.convert.shikra import LANGUAGE_ALLOWANCE, load_converted
from extract.families.i2t import CLIP_MEAN, CLIP_STD, I2TAgent
from extract.hub import Source
from extract.loading import seeded, torch_dtype

IMAGE_SIZE = 224
VISION_LAYER = -2
MANUAL_WEIGHTS = ("Shikra-7B is published only as a delta over the licensed LLaMA-7B: convert it with `transagent "
                  "agents convert shikra <shikra-7b-delta dir> <DIR> --base <llama-7b dir>` and pass "
                  "--agent-path shikra=<DIR>")

TINY_CONFIG = {
    "image_size": 32,
    "vision": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 3, "num_attention_heads": 4,
               "image_size": 32, "patch_size": 8},
    "text": {"hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 4, "max_position_embeddings": 128},
}


class Shikra(I2TAgent):
    def __init__(self, *, vision_tower, projector, language_model, tokenizer, vision_layer: int, image_size: int,
                 device: str):
        self.vision_tower = vision_tower.eval().requires_grad_(False)
        self.projector = projector.eval().requires_grad_(False)
        self.language_model = language_model.eval().requires_grad_(False)
        self.vision_layer = int(vision_layer)
        if tokenizer.pad_token is None:  # LLaMA has no pad token; padded positions are masked out anyway
            tokenizer.pad_token = tokenizer.unk_token
        super().__init__(tokenizer=tokenizer, image_size=image_size, feature_dim=projector.out_features,
                         device=device, dtype=vision_tower.dtype)

    def encode_images(self, pixels):
        hidden = self.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[self.vision_layer]
        patches = hidden[:, 1:].to(self.projector.weight.dtype)  # drop CLS
        return self.projector(patches).float().mean(dim=1)

    def encode_prompts(self, input_ids, attention_mask):
        return self.language_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def tiny_tokenizer():
    """A LLaMA tokenizer built in code: LLaMA's special tokens, the 256 byte-fallback tokens and '▁'."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{byte:02X}>": 3 + byte for byte in range(256)})
    vocab["▁"] = len(vocab)
    return LlamaTokenizer(vocab=vocab, merges=[], add_bos_token=True)


def build_tiny(seed: int):
    """Tiny random vision tower, projector, LLaMA and tokenizer (also the source format for converter tests)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaModel

    cfg = TINY_CONFIG
    tokenizer = tiny_tokenizer()
    with seeded(seed):
        vision_tower = CLIPVisionModel(CLIPVisionConfig(**cfg["vision"]))
        projector = torch.nn.Linear(cfg["vision"]["hidden_size"], cfg["text"]["hidden_size"])
        language_model = LlamaModel(LlamaConfig(**cfg["text"], vocab_size=len(tokenizer),
                                                bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id))
    return vision_tower, projector, language_model, tokenizer


def load(request: LoadRequest) -> Shikra:
    dtype = torch_dtype(request.dtype)
    if request.tiny:
        vision_tower, projector, language_model, tokenizer = build_tiny(request.seed)
        vision_tower, projector, language_model = vision_tower.to(dtype), projector.to(dtype), language_model.to(dtype)
        image_size = TINY_CONFIG["image_size"]
    else:
        source = request.source or SPEC.source
        if source.local_path is None:
            raise ValueError(f"agent 'shikra' needs a local directory: {MANUAL_WEIGHTS}.")
        vision_tower, projector, language_model, tokenizer = load_converted(Path(source.local_path), dtype)
        image_size = IMAGE_SIZE
    return Shikra(vision_tower=vision_tower.to(request.device), projector=projector.to(request.device),
                  language_model=language_model.to(request.device), tokenizer=tokenizer, vision_layer=VISION_LAYER,
                  image_size=image_size, device=request.device)


SPEC = AgentSpec(
    name="shikra",
    family="i2t",
    source=Source(note="local directory from `transagent agents convert shikra` (Shikra-7B delta over LLaMA-7B)"),
    preprocessing={
        "view": 0, "image_size": IMAGE_SIZE, "resize": "bicubic", "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
        "vision_layer": VISION_LAYER,
        "image": "CLIP ViT-L/14 hidden state at vision_layer, patch tokens -> mm_projector -> mean, L2-normalised",
        "text": "LLaMA last hidden state, mean over non-padding tokens (right padding), L2-normalised",
        "prompt": "the official per-dataset template (DS_TEMPLATE)", "score": "cosine",
    },
    emits=("scores", "image_features"),
    load=load,
    tiny_config=TINY_CONFIG,
    description="Shikra-7B: cosine of the projected CLIP-L patch features and each class's LLaMA feature [C].",
    allowance=LANGUAGE_ALLOWANCE,
    manual_weights=MANUAL_WEIGHTS,
)
