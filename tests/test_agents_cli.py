"""`transagent agents ls|convert`: the listing, and conversions driven from the CLI on tiny checkpoints in the
published formats, up to an extraction that loads the converted directory through --agent-path."""
import json
import pickle
import subprocess
import sys

import numpy as np
import torch
from click.testing import CliRunner

from pipelines.cli import main

AGENTS = ("dino", "mae", "sam", "vitdet", "gpt3", "vicuna", "bert", "sd", "pixart", "blip2", "shikra")


def invoke(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


# ---- ls ---------------------------------------------------------------------------------------------------------

def test_ls_shows_family_source_emits_and_description():
    from extract.agents import registry

    result = invoke("agents", "ls")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    heads = [line.split()[0] for line in lines[1:] if line and not line.startswith(" ")][:len(AGENTS)]
    assert heads == list(AGENTS)  # the paper's order: vision, language, t2i, i2t
    assert "facebook/dino-vitb16" in result.output
    assert "CompVis/stable-diffusion-v1-4@133a221b8aa7292a167afc5127cb63fb5005638b" in result.output
    assert "--agent-path vitdet=DIR" in result.output and "agents convert shikra" in result.output
    for name, spec in registry().items():
        assert f"emits: {', '.join(spec.emits)}" in result.output and spec.description in result.output, name

    tiny = invoke("agents", "ls", "--preset", "tiny", "--agents", "dino,blip2", "--json")
    assert tiny.exit_code == 0, tiny.output
    entries = [json.loads(line) for line in tiny.output.splitlines()]
    assert [(e["name"], e["family"], e["emits"]) for e in entries] == [
        ("dino", "vision", ["tokens", "token_mean", "views", "tokens_scale"]),
        ("blip2", "i2t", ["scores", "image_features"])]
    assert all(e["source"].startswith("tiny random weights") for e in entries)


def test_ls_rejects_unknown_agents_and_imports_no_torch():
    result = invoke("agents", "ls", "--agents", "dino,dalle")
    assert result.exit_code != 0 and "dalle" in result.output and "shikra" in result.output
    script = ("import sys\nfrom click.testing import CliRunner\nfrom pipelines.cli import main\n"
              "result = CliRunner().invoke(main, ['agents', 'ls'])\nassert result.exit_code == 0, result.output\n"
              "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n")
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert output.returncode == 0, output.stderr
    assert output.stdout.strip() == "NO-TORCH"


# ---- convert: argument checks -----------------------------------------------------------------------------------

def test_convert_argument_errors(tmp_path):
    missing = tmp_path / "missing.pkl"
    unknown = invoke("agents", "convert", "dino", missing, tmp_path / "out")
    assert unknown.exit_code != 0 and "no converter for 'dino'" in unknown.output
    assert "shikra" in unknown.output and "vitdet" in unknown.output
    extra = invoke("agents", "convert", "vitdet", missing, tmp_path / "out", "--base", tmp_path)
    assert extra.exit_code == 2 and "--base does not apply to the vitdet converter" in extra.output
    needs_base = invoke("agents", "convert", "shikra", tmp_path, tmp_path / "out")
    assert needs_base.exit_code == 2 and "the shikra converter needs --base" in needs_base.output
    absent = invoke("agents", "convert", "vitdet", missing, tmp_path / "out")
    assert absent.exit_code == 1 and "does not exist" in absent.output
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(pickle.dumps({"model": {"weight": range(3)}}))
    refused = invoke("agents", "convert", "vitdet", garbage, tmp_path / "out")
    assert refused.exit_code == 1 and "vitdet conversion failed" in refused.output and "refusing" in refused.output
    assert not isinstance(refused.exception, pickle.UnpicklingError)  # a message, not a traceback


# ---- convert vitdet, then extract with --agent-path --------------------------------------------------------------

HIDDEN, HEAD_DIM, PATCH, WINDOW, TRAIN_GRID, PRETRAIN_GRID = 32, 8, 8, 2, 8, 4
WINDOWED = (0,)   # block 1 is global


def detectron2_checkpoint(path, seed=0):
    """A model-zoo pickle with detectron2's ViTDet key names (backbone.net.*) plus a head the converter skips."""
    rng = np.random.default_rng(seed)

    def array(*shape):
        return (0.05 * rng.standard_normal(shape)).astype(np.float32)

    weights = {"backbone.net.pos_embed": array(1, 1 + PRETRAIN_GRID ** 2, HIDDEN),
               "backbone.net.patch_embed.proj.weight": array(HIDDEN, 3, PATCH, PATCH),
               "backbone.net.patch_embed.proj.bias": array(HIDDEN),
               "roi_heads.box_predictor.cls_score.weight": array(81, 16)}
    for block in range(2):
        table = 2 * (WINDOW if block in WINDOWED else TRAIN_GRID) - 1
        prefix = f"backbone.net.blocks.{block}."
        for name, shape in (("norm1.weight", (HIDDEN,)), ("norm1.bias", (HIDDEN,)),
                            ("attn.qkv.weight", (3 * HIDDEN, HIDDEN)), ("attn.qkv.bias", (3 * HIDDEN,)),
                            ("attn.proj.weight", (HIDDEN, HIDDEN)), ("attn.proj.bias", (HIDDEN,)),
                            ("attn.rel_pos_h", (table, HEAD_DIM)), ("attn.rel_pos_w", (table, HEAD_DIM)),
                            ("norm2.weight", (HIDDEN,)), ("norm2.bias", (HIDDEN,)),
                            ("mlp.fc1.weight", (4 * HIDDEN, HIDDEN)), ("mlp.fc1.bias", (4 * HIDDEN,)),
                            ("mlp.fc2.weight", (HIDDEN, 4 * HIDDEN)), ("mlp.fc2.bias", (HIDDEN,))):
            weights[prefix + name] = array(*shape)
    path.write_bytes(pickle.dumps({"model": weights, "__author__": "Detectron2 Model Zoo"}, protocol=2))
    return weights


def test_convert_vitdet_then_extract_with_agent_path(tmp_path):
    from transformers import VitDetModel

    from cache_schema import CacheReader, verify
    from pipelines.datasets import make_synthetic

    source = tmp_path / "model_final_61ccd1.pkl"
    weights = detectron2_checkpoint(source)
    output = tmp_path / "vitdet-b"
    result = invoke("agents", "convert", "vitdet", source, output)
    assert result.exit_code == 0, result.output
    assert f"--agent-path vitdet={output}" in result.output
    model = VitDetModel.from_pretrained(output)
    assert model.config.window_block_indices == list(WINDOWED) and model.config.num_hidden_layers == 2
    np.testing.assert_array_equal(model.state_dict()["encoder.layer.1.attention.rel_pos_h"].numpy(),
                                  weights["backbone.net.blocks.1.attn.rel_pos_h"])

    make_synthetic(tmp_path / "data", num_classes=2, per_class=(2, 1, 1))
    args = ["extract", "--dataset", "synthetic", "--preset", "paper", "--agents", "vitdet", "--shots", "1",
            "--views", "1", "--layers", "0,1", "--device", "cpu", "--data-root", tmp_path / "data",
            "--cache-root", tmp_path / "cache", "--agent-path", f"vitdet={output}"]
    extracted = invoke(*args)
    assert extracted.exit_code == 0, extracted.output
    (manifest_path,) = (tmp_path / "cache").glob("synthetic/vitdet/*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    assert verify(manifest_path.parent) == []
    assert sorted(manifest["fields"]["agent"]["local_weights"]) == ["config.json", "conversion.json",
                                                                   "model.safetensors"]
    reader = CacheReader(manifest_path.parent)
    assert reader.arrays["tokens"].row_shape == (2, 196, HIDDEN)  # ViT-B/16 student grid, the agent's width
    assert len(reader.rows) == 1  # one base class x 1 shot x 1 view

    again = invoke(*args)
    assert again.exit_code == 0 and "1 already complete" in again.output
    (output / "model.safetensors").write_bytes((output / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    changed = invoke(*args, "--dry-run")
    assert changed.exit_code == 0 and "0 already complete" in changed.output  # other weights, other cache


# ---- convert shikra ---------------------------------------------------------------------------------------------

def test_convert_shikra_from_the_cli(tmp_path):
    from transformers import LlamaForCausalLM

    from extract.agents.shikra import build_tiny
    from extract.convert.shikra import MANIFEST, load_converted

    vision_tower, projector, language_model, tokenizer = build_tiny(seed=0)
    base_model = LlamaForCausalLM(language_model.config)
    base_model.save_pretrained(tmp_path / "llama-7b")
    tokenizer.save_pretrained(tmp_path / "llama-7b")
    generator = torch.Generator().manual_seed(1)
    delta = {name: 0.01 * torch.randn(tensor.shape, generator=generator)
             for name, tensor in base_model.state_dict().items()}
    delta["model.mm_projector.weight"] = torch.randn(projector.weight.shape, generator=generator)
    delta["model.mm_projector.bias"] = torch.randn(projector.bias.shape, generator=generator)
    (tmp_path / "shikra-7b-delta").mkdir()
    torch.save(delta, tmp_path / "shikra-7b-delta" / "pytorch_model.bin")
    tokenizer.save_pretrained(tmp_path / "shikra-7b-delta")
    vision_tower.save_pretrained(tmp_path / "clip-vit-large-patch14")

    args = ["agents", "convert", "shikra", tmp_path / "shikra-7b-delta", tmp_path / "shikra-7b", "--base",
            tmp_path / "llama-7b", "--vision-tower", tmp_path / "clip-vit-large-patch14", "--dtype", "float32"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert f"--agent-path shikra={tmp_path / 'shikra-7b'}" in result.output
    assert json.loads((tmp_path / "shikra-7b" / MANIFEST).read_text())["dtype"] == "float32"
    tower, converted_projector, llm, _ = load_converted(tmp_path / "shikra-7b", torch.float32)
    torch.testing.assert_close(converted_projector.weight, delta["model.mm_projector.weight"])
    key = "layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(llm.state_dict()[key], base_model.state_dict()["model." + key] + delta["model." + key])

    again = invoke(*args)
    assert again.exit_code == 1 and "shikra conversion failed" in again.output and "not empty" in again.output
