"""Tiny checkpoints laid out as each agent's real weights are: the hub repository's architecture class (e.g.
ViTMAEForPreTraining for facebook/vit-mae-base, Blip2ForConditionalGeneration for Salesforce/blip2-opt-2.7b) and
its subfolders, saved with save_pretrained, or the directory a converter writes. Used by the loading and
`agents check` tests."""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from pipelines.presets import student_spec


STUDENT = student_spec("tiny")
MAE_WIDTH, MAE_DEPTH, MAE_PATCH, MAE_GRID = 128, 2, 8, 4


def save_dino(directory, pooler=False):
    from transformers import ViTConfig, ViTModel

    from extract.agents.dino import TINY_CONFIG

    torch.manual_seed(0)
    ViTModel(ViTConfig(**TINY_CONFIG), add_pooling_layer=pooler).save_pretrained(directory)
    return Path(directory)


def save_mae(directory):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from extract.agents.mae import TINY_CONFIG

    torch.manual_seed(0)
    config = ViTMAEConfig(**TINY_CONFIG, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                          decoder_num_attention_heads=2, decoder_intermediate_size=64)
    ViTMAEForPreTraining(config).save_pretrained(directory)
    return Path(directory)


def save_sam(directory):
    from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

    from extract.agents.sam import TINY_CONFIG

    torch.manual_seed(0)
    width = TINY_CONFIG["output_channels"]
    config = SamConfig(vision_config=SamVisionConfig(**TINY_CONFIG),
                       prompt_encoder_config=SamPromptEncoderConfig(hidden_size=width, image_size=64, patch_size=8,
                                                                    mask_input_channels=4),
                       mask_decoder_config=SamMaskDecoderConfig(hidden_size=width, mlp_dim=64, num_hidden_layers=1,
                                                                num_attention_heads=2, iou_head_hidden_dim=16))
    SamModel(config).save_pretrained(directory)
    return Path(directory)


def save_vitdet(directory):
    from transformers import VitDetConfig, VitDetModel

    from extract.agents.vitdet import TINY_CONFIG

    torch.manual_seed(0)
    VitDetModel(VitDetConfig(**TINY_CONFIG)).save_pretrained(directory)
    return Path(directory)


def save_bert(directory):
    """sentence-transformers/all-MiniLM-L6-v2 is a BertModel with its pooler."""
    from transformers import BertConfig, BertModel

    from extract.agents.bert import TINY_CONFIG, tiny_bert_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_bert_tokenizer()
    config = {key: value for key, value in TINY_CONFIG.items() if key != "tokenizer"}
    BertModel(BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **config)
              ).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def save_vicuna(directory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from extract.agents.vicuna import TINY_LLM
    from extract.families.language import tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer("<s> $A", unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY_LLM)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def save_blip2(directory):
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from extract.agents.blip2 import TINY_CONFIG as cfg
    from extract.agents.blip2 import tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    text = dict(cfg["text"], model_type="opt", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = Blip2Config(vision_config=cfg["vision"], qformer_config=cfg["qformer"], text_config=text,
                         num_query_tokens=cfg["num_query_tokens"])
    Blip2ForConditionalGeneration(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def save_sd(directory):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from extract.agents.sd import TINY_CONFIG as cfg
    from extract.agents.sd import tiny_tokenizer

    torch.manual_seed(0)
    directory = Path(directory)
    tokenizer = tiny_tokenizer(cfg["text"]["max_position_embeddings"])
    UNet2DConditionModel(**cfg["unet"]).save_pretrained(directory / "unet")
    AutoencoderKL(**cfg["vae"]).save_pretrained(directory / "vae")
    CLIPTextModel(CLIPTextConfig(**cfg["text"], vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
                  ).save_pretrained(directory / "text_encoder")
    tokenizer.save_pretrained(directory / "tokenizer")
    return directory


def save_pixart(directory):
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from extract.agents.pixart import TINY_CONFIG as cfg
    from extract.agents.pixart import tiny_tokenizer

    torch.manual_seed(0)
    directory = Path(directory)
    tokenizer = tiny_tokenizer()
    PixArtTransformer2DModel(**cfg["transformer"]).save_pretrained(directory / "transformer")
    AutoencoderKL(**cfg["vae"]).save_pretrained(directory / "vae")
    T5EncoderModel(T5Config(**cfg["text"], vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id)).save_pretrained(directory / "text_encoder")
    tokenizer.save_pretrained(directory / "tokenizer")
    return directory


def save_shikra(directory):
    """The directory `transagent agents convert shikra` writes (LLaMA saved with its LM head)."""
    from transformers import LlamaForCausalLM

    from extract.agents.shikra import build_tiny
    from extract.convert.shikra import FORMAT, LANGUAGE_DIR, MANIFEST, PROJECTOR_FILE, VERSION, VISION_DIR

    directory = Path(directory)
    vision_tower, projector, language_model, tokenizer = build_tiny(seed=0)
    LlamaForCausalLM(language_model.config).save_pretrained(directory / LANGUAGE_DIR)
    tokenizer.save_pretrained(directory / LANGUAGE_DIR)
    vision_tower.save_pretrained(directory / VISION_DIR)
    save_file({"weight": projector.weight.detach().contiguous(), "bias": projector.bias.detach().contiguous()},
              directory / PROJECTOR_FILE)
    (directory / MANIFEST).write_text(json.dumps({"format": FORMAT, "version": VERSION}))
    return directory


def edit_weights(directory, change):
    """Apply `change(state_dict)` to the directory's single safetensors file, in place."""
    (path,) = sorted(Path(directory).glob("*.safetensors"))
    state = load_file(path)
    change(state)
    save_file(state, path, metadata={"format": "pt"})


def official_mae_weights(seed=0, decoder=False):
    """`model` of mae_pretrain_vit_base.pth, in miniature: timm ViT names, fused qkv, final norm."""
    generator = torch.Generator().manual_seed(seed)
    width, grid, patch = MAE_WIDTH, MAE_GRID, MAE_PATCH

    def tensor(*shape, offset=0.0):
        return offset + 0.05 * torch.randn(shape, generator=generator)

    weights = {"cls_token": tensor(1, 1, width), "pos_embed": tensor(1, 1 + grid * grid, width),
               "patch_embed.proj.weight": tensor(width, 3, patch, patch), "patch_embed.proj.bias": tensor(width),
               "norm.weight": tensor(width, offset=1.0), "norm.bias": tensor(width)}
    for block in range(MAE_DEPTH):
        prefix = f"blocks.{block}."
        for name, shape, offset in (("norm1.weight", (width,), 1.0), ("norm1.bias", (width,), 0.0),
                                    ("attn.qkv.weight", (3 * width, width), 0.0), ("attn.qkv.bias", (3 * width,), 0.0),
                                    ("attn.proj.weight", (width, width), 0.0), ("attn.proj.bias", (width,), 0.0),
                                    ("norm2.weight", (width,), 1.0), ("norm2.bias", (width,), 0.0),
                                    ("mlp.fc1.weight", (4 * width, width), 0.0), ("mlp.fc1.bias", (4 * width,), 0.0),
                                    ("mlp.fc2.weight", (width, 4 * width), 0.0), ("mlp.fc2.bias", (width,), 0.0)):
            weights[prefix + name] = tensor(*shape, offset=offset)
    if decoder:  # a full training checkpoint also holds the pixel decoder
        weights.update({"mask_token": tensor(1, 1, 32), "decoder_embed.weight": tensor(32, width),
                        "decoder_pos_embed": tensor(1, 1 + grid * grid, 32), "decoder_pred.weight": tensor(192, 32)})
    return weights
