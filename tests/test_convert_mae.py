"""FAIR MAE checkpoint -> transformers ViTMAE: a tiny fake with the official (timm) key names, checked against an
independent forward of those weights, then loaded as the mae agent."""
import datetime
import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from agent_checkpoints import MAE_DEPTH as DEPTH
from agent_checkpoints import MAE_GRID as GRID
from agent_checkpoints import MAE_PATCH as PATCH
from agent_checkpoints import MAE_WIDTH as WIDTH
from agent_checkpoints import official_mae_weights as official_weights
from extract.agents import LoadRequest, Source, get_agent
from extract.loading import WeightsMismatch, recording
from extract.convert import get_converter
from extract.convert.mae import convert
from pipelines.cli import main
from pipelines.presets import student_spec

HEADS = WIDTH // 64  # MAE's ViTs have heads of 64
STUDENT = student_spec("tiny")


def reference_blocks(weights, pixels):
    """Every block's patch tokens, computed from the official weights the way MAE's timm ViT does."""
    batch = pixels.shape[0]
    x = F.conv2d(pixels, weights["patch_embed.proj.weight"], weights["patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2) + weights["pos_embed"][:, 1:]
    cls = (weights["cls_token"] + weights["pos_embed"][:, :1]).expand(batch, -1, -1)
    x, blocks = torch.cat([cls, x], dim=1), []
    for block in range(DEPTH):
        w = {key[len(f"blocks.{block}."):]: value for key, value in weights.items()
             if key.startswith(f"blocks.{block}.")}
        y = F.layer_norm(x, (WIDTH,), w["norm1.weight"], w["norm1.bias"], eps=1e-6)
        q, k, v = F.linear(y, w["attn.qkv.weight"], w["attn.qkv.bias"]).reshape(
            batch, -1, 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-2, -1) / (WIDTH // HEADS) ** 0.5, dim=-1) @ v
        x = x + F.linear(attention.transpose(1, 2).reshape(batch, -1, WIDTH), w["attn.proj.weight"],
                         w["attn.proj.bias"])
        y = F.layer_norm(x, (WIDTH,), w["norm2.weight"], w["norm2.bias"], eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(y, w["mlp.fc1.weight"], w["mlp.fc1.bias"])), w["mlp.fc2.weight"],
                         w["mlp.fc2.bias"])
        blocks.append(x[:, 1:])
    return torch.stack(blocks, dim=1)


def write_official(path, weights):
    torch.save({"model": weights}, path)
    return path


def test_converted_mae_runs_as_the_paper_checkpoint(tmp_path):
    weights = official_weights(decoder=True)  # a full training checkpoint: its pixel decoder is left out
    out = convert(write_official(tmp_path / "mae_pretrain_vit_base.pth", weights), tmp_path / "mae")
    assert get_converter("mae") is convert
    record = json.loads((out / "conversion.json").read_text())
    assert record["source_file"] == "mae_pretrain_vit_base.pth" and record["decoder_tensors_skipped"] == 4
    assert record["encoder_tensors"] == 6 + 12 * DEPTH
    with recording() as loaded:
        runtime = get_agent("mae").load(LoadRequest(tiny=False, student=STUDENT, source=Source(local_path=str(out))))
    assert [(r.missing, r.unexpected) for r in loaded] == [([], [])]  # the converted encoder fits exactly
    config = runtime.model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (WIDTH, DEPTH, HEADS)
    assert (config.image_size, config.patch_size, config.mask_ratio) == (GRID * PATCH, PATCH, 0.0)
    torch.testing.assert_close(runtime.model.embeddings.position_embeddings, weights["pos_embed"])  # not re-made
    pixels = torch.randn(2, 3, GRID * PATCH, GRID * PATCH, generator=torch.Generator().manual_seed(3))
    tokens = runtime.encode(pixels)
    torch.testing.assert_close(tokens, reference_blocks(weights, pixels).reshape(tokens.shape), atol=1e-5,
                               rtol=1e-4)


def test_keys_other_than_the_encoder_and_decoder_are_refused(tmp_path):
    fine_tuned = {**official_weights(), "head.weight": torch.zeros(10, WIDTH), "fc_norm.weight": torch.ones(WIDTH)}
    with pytest.raises(ValueError, match=r"2 key\(s\) are not MAE encoder weights.*fc_norm"):
        convert(write_official(tmp_path / "finetuned.pth", fine_tuned), tmp_path / "out1")
    without_norm = {key: value for key, value in official_weights().items() if key != "norm.weight"}
    with pytest.raises(WeightsMismatch, match=r"agent 'mae'.*1 missing key"):
        convert(write_official(tmp_path / "nonorm.pth", without_norm), tmp_path / "out2")
    with pytest.raises(ValueError, match="not an MAE ViT checkpoint"):
        convert(write_official(tmp_path / "other.pth", {"weight": torch.zeros(2)}), tmp_path / "out3")


def test_the_checkpoint_is_read_without_running_pickled_code(tmp_path):
    torch.save({"model": official_weights(), "built": datetime.date(2021, 11, 11)}, tmp_path / "evil.pth")
    with pytest.raises(pickle.UnpicklingError):
        convert(tmp_path / "evil.pth", tmp_path / "out")
    result = CliRunner().invoke(main, ["agents", "convert", "mae", str(tmp_path / "evil.pth"), str(tmp_path / "o")])
    assert result.exit_code == 1 and "mae conversion failed" in result.output


def test_convert_mae_from_the_cli(tmp_path):
    source = write_official(tmp_path / "mae_pretrain_vit_base.pth", official_weights())
    result = CliRunner().invoke(main, ["agents", "convert", "mae", str(source), str(tmp_path / "mae")])
    assert result.exit_code == 0, result.output
    assert f"--agent-path mae={tmp_path / 'mae'}" in result.output
    assert sorted(p.name for p in (tmp_path / "mae").iterdir()) == ["config.json", "conversion.json",
                                                                   "model.safetensors"]
