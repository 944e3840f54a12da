"""detectron2 ViTDet checkpoint -> transformers VitDet: built on a tiny fake checkpoint with detectron2's key names."""
import pickle

import numpy as np
import pytest
import torch

from cache_schema.student import StudentGrid
from extract.agents import LoadRequest, Source, get_agent
from extract.convert import converter_names, get_converter
from extract.convert.vitdet import convert

HIDDEN, HEAD_DIM, DEPTH, PATCH = 32, 8, 3, 8
WINDOWED = (0, 1)              # block 2 is global
WINDOW, TRAIN_GRID, PRETRAIN_GRID = 2, 8, 4   # tables: windowed 2*2-1 = 3, global 2*8-1 = 15; pos_embed 1 + 4*4


def fake_detectron2_weights(seed=0):
    """backbone.net.* as detectron2's ViT names them, plus heads and pyramid weights the converter must skip."""
    rng = np.random.default_rng(seed)

    def array(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    weights = {
        "backbone.net.pos_embed": array(1, 1 + PRETRAIN_GRID ** 2, HIDDEN),
        "backbone.net.patch_embed.proj.weight": array(HIDDEN, 3, PATCH, PATCH),
        "backbone.net.patch_embed.proj.bias": array(HIDDEN),
        "backbone.simfp_2.0.weight": array(HIDDEN, HIDDEN // 2, 2, 2),
        "roi_heads.box_predictor.cls_score.weight": array(81, 16),
        "pixel_mean": np.array([123.675, 116.28, 103.53], np.float32),
    }
    for block in range(DEPTH):
        table = 2 * (WINDOW if block in WINDOWED else TRAIN_GRID) - 1
        prefix = f"backbone.net.blocks.{block}."
        weights.update({
            prefix + "norm1.weight": array(HIDDEN), prefix + "norm1.bias": array(HIDDEN),
            prefix + "attn.qkv.weight": array(3 * HIDDEN, HIDDEN), prefix + "attn.qkv.bias": array(3 * HIDDEN),
            prefix + "attn.proj.weight": array(HIDDEN, HIDDEN), prefix + "attn.proj.bias": array(HIDDEN),
            prefix + "attn.rel_pos_h": array(table, HEAD_DIM), prefix + "attn.rel_pos_w": array(table, HEAD_DIM),
            prefix + "norm2.weight": array(HIDDEN), prefix + "norm2.bias": array(HIDDEN),
            prefix + "mlp.fc1.weight": array(4 * HIDDEN, HIDDEN), prefix + "mlp.fc1.bias": array(4 * HIDDEN),
            prefix + "mlp.fc2.weight": array(HIDDEN, 4 * HIDDEN), prefix + "mlp.fc2.bias": array(HIDDEN),
        })
    return weights


def expected_name(source_key):
    """The transformers name of each detectron2 backbone weight, written out independently of the converter."""
    key = source_key[len("backbone.net."):]
    fixed = {"pos_embed": "embeddings.position_embeddings",
             "patch_embed.proj.weight": "embeddings.projection.weight",
             "patch_embed.proj.bias": "embeddings.projection.bias"}
    if key in fixed:
        return fixed[key]
    _, block, rest = key.split(".", 2)
    return f"encoder.layer.{block}." + rest.replace("attn.", "attention.")


def write_model_zoo_pickle(path, weights):
    """A model-zoo style pickle, with the numpy 1.x module path the published files carry."""
    data = pickle.dumps({"model": weights, "__author__": "Detectron2 Model Zoo"}, protocol=2)
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))


def check_converted(directory, weights):
    from transformers import VitDetModel

    model = VitDetModel.from_pretrained(directory)
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers) == (HIDDEN, DEPTH)
    assert config.num_attention_heads == HIDDEN // HEAD_DIM and config.patch_size == PATCH
    assert (config.image_size, config.pretrain_image_size) == (TRAIN_GRID * PATCH, PRETRAIN_GRID * PATCH)
    assert list(config.window_block_indices) == list(WINDOWED) and config.window_size == WINDOW
    assert config.use_relative_position_embeddings and config.mlp_ratio == 4 and config.qkv_bias
    state = model.state_dict()
    backbone = {key: value for key, value in weights.items() if key.startswith("backbone.net.")}
    assert len(state) == len(backbone)
    for key, value in backbone.items():
        np.testing.assert_array_equal(state[expected_name(key)].numpy(), value, err_msg=key)
    return model


def test_model_zoo_pickle_round_trip(tmp_path):
    weights = fake_detectron2_weights()
    write_model_zoo_pickle(tmp_path / "model_final.pkl", weights)
    out = convert(tmp_path / "model_final.pkl", tmp_path / "vitdet")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "conversion.json").is_file()
    model = check_converted(out, weights)
    assert model.encoder.layer[2].attention.rel_pos_h.shape == (2 * TRAIN_GRID - 1, HEAD_DIM)  # rel-pos kept


def test_training_pth_round_trip(tmp_path):
    weights = fake_detectron2_weights(seed=1)
    torch.save({"model": {key: torch.from_numpy(value) for key, value in weights.items()}, "iteration": 7},
               tmp_path / "model_final.pth")
    check_converted(convert(tmp_path / "model_final.pth", tmp_path / "vitdet"), weights)


def test_converted_directory_runs_as_the_vitdet_agent(tmp_path):
    write_model_zoo_pickle(tmp_path / "model.pkl", fake_detectron2_weights())
    out = get_converter("vitdet")(tmp_path / "model.pkl", tmp_path / "vitdet")
    student = StudentGrid("TransAgent-Tiny-CLIP", None, image_size=32, patch_size=8, width=64, layers=3)
    runtime = get_agent("vitdet").load(LoadRequest(tiny=False, student=student, source=Source(local_path=str(out))))
    tokens = runtime.encode(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, DEPTH, 16, HIDDEN) and torch.isfinite(tokens).all()
    assert runtime.source["source"] == f"local:{out}"


def test_vitdet_without_a_local_path_says_how_to_convert():
    student = StudentGrid("TransAgent-Tiny-CLIP", None, image_size=32, patch_size=8, width=64, layers=3)
    with pytest.raises(ValueError, match="agents convert vitdet"):
        get_agent("vitdet").load(LoadRequest(tiny=False, student=student))


def test_rejects_checkpoints_without_a_vitdet_backbone(tmp_path):
    resnet = {"backbone.bottom_up.stem.conv1.weight": np.zeros((2, 3), np.float32)}
    write_model_zoo_pickle(tmp_path / "resnet.pkl", resnet)
    with pytest.raises(ValueError, match="backbone.net"):
        convert(tmp_path / "resnet.pkl", tmp_path / "out")
    weights = {key: value for key, value in fake_detectron2_weights().items() if "rel_pos" not in key}
    write_model_zoo_pickle(tmp_path / "norel.pkl", weights)
    with pytest.raises(ValueError, match="relative-position"):
        convert(tmp_path / "norel.pkl", tmp_path / "out")


def test_pickles_may_hold_arrays_only(tmp_path):
    import datetime

    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"model": {"backbone.net.x": datetime.date(2020, 1, 1)}}))
    with pytest.raises(pickle.UnpicklingError, match="numpy arrays only"):
        convert(tmp_path / "evil.pkl", tmp_path / "out")


def test_converter_registry():
    assert "vitdet" in converter_names() and get_converter("vitdet") is convert
    with pytest.raises(KeyError, match="no converter"):
        get_converter("nope")
