"""BLIP-2 OPT-2.7b (image-to-text): cosine of the projected Q-Former feature and OPT class features (§3.5).

Image feature = Q-Former pooled output (its first query token) -> language_projection, in OPT's 2560-d space.
Class feature = OPT's last hidden state (after the final LayerNorm, i.e. hidden_states[-1]) averaged over the
prompt's real tokens with the attention mask (the official code passed no mask and averaged padding too).
"""
from __future__ import annotations

from extract.agents.base import AgentSpec, LoadRequest
from extract.families.i2t import CLIP_MEAN, CLIP_STD, I2TAgent
from extract.hub import Source, hub_commit
from extract.loading import from_pretrained, load_model, seeded, torch_dtype

HUB_ID = "Salesforce/blip2-opt-2.7b"
IMAGE_SIZE = 224

TINY_CONFIG = {
    "image_size": 32,
    "num_query_tokens": 4,
    "vision": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
               "image_size": 32, "patch_size": 8, "initializer_range": 0.02},  # the default 1e-10 is ~0 in fp16
    "qformer": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
                "encoder_hidden_size": 32, "vocab_size": 64},
    "text": {"hidden_size": 48, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "word_embed_proj_dim": 48, "max_position_embeddings": 128},
}


class Blip2(I2TAgent):
    def __init__(self, *, model, tokenizer, image_size: int, device: str, resolved_revision: str | None = None):
        self.model = model.eval().requires_grad_(False)
        super().__init__(tokenizer=tokenizer, image_size=image_size, feature_dim=model.config.text_config.hidden_size,
                         device=device, dtype=model.vision_model.dtype,
                         resolved_revision=resolved_revision)

    def encode_images(self, pixels):
        import torch

        model = self.model
        image_embeds = model.vision_model(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        queries = model.qformer(query_embeds=model.query_tokens.expand(image_embeds.shape[0], -1, -1),
                                encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask).last_hidden_state
        pooled = queries[:, 0]  # the Q-Former's pooled output is its first query token
        return model.language_projection(pooled.to(model.language_projection.weight.dtype))

    def encode_prompts(self, input_ids, attention_mask):
        decoder = self.model.language_model.base_model  # OPT; last_hidden_state is after the final LayerNorm
        return decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def tiny_tokenizer():
    """An OPT (GPT-2 byte-level BPE) tokenizer built in code: every byte is a token, no merges; '</s>' is BOS."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import GPT2Tokenizer

    tokens = sorted(ByteLevel.alphabet()) + ["<pad>", "</s>"]
    return GPT2Tokenizer(vocab={token: i for i, token in enumerate(tokens)}, merges=[], bos_token="</s>",
                         eos_token="</s>", unk_token="</s>", pad_token="<pad>", add_bos_token=True)


def load(request: LoadRequest) -> Blip2:
    from transformers import AutoTokenizer, Blip2Config, Blip2Model

    dtype = torch_dtype(request.dtype)
    if request.tiny:
        cfg = TINY_CONFIG
        tokenizer = tiny_tokenizer()
        text = dict(cfg["text"], model_type="opt", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        config = Blip2Config(vision_config=cfg["vision"], qformer_config=cfg["qformer"], text_config=text,
                             num_query_tokens=cfg["num_query_tokens"])
        with seeded(request.seed):
            model = Blip2Model(config).to(dtype)  # built in float32
        image_size, revision = cfg["image_size"], None
    else:
        source = request.source or SPEC.source
        model = load_model(Blip2Model, source, "blip2", dtype=dtype)  # Q-Former stays float32
        tokenizer = from_pretrained(AutoTokenizer.from_pretrained, source, "blip2")
        image_size, revision = IMAGE_SIZE, hub_commit(source, "config.json")
    return Blip2(model=model.to(request.device), tokenizer=tokenizer, image_size=image_size, device=request.device,
                 resolved_revision=revision)


SPEC = AgentSpec(
    name="blip2",
    family="i2t",
    source=Source(hub_id=HUB_ID),
    preprocessing={
        "view": 0, "image_size": IMAGE_SIZE, "resize": "bicubic", "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
        "image": "Q-Former first query token -> language_projection, L2-normalised",
        "text": "OPT last hidden state, mean over non-padding tokens (right padding), L2-normalised",
        "prompt": "the official per-dataset template (DS_TEMPLATE)", "score": "cosine",
    },
    emits=("scores", "image_features"),
    load=load,
    tiny_config=TINY_CONFIG,
    description="BLIP-2 OPT-2.7b: cosine of the projected Q-Former feature and each class's OPT feature [C].",
)
