"""Which text each agent reads, as planned by `build_jobs` (pipelines/texts.py): official descriptions by default,
generated ones on request, SD conditioned on vicuna's descriptions, the official per-dataset template elsewhere,
and the datasets without official files. Planning only: no model is loaded here."""
import json
import logging

import click
import pytest

from extract.runner import planned_path
from pipelines.extraction import ExtractOptions, build_jobs
from pipelines.options import parse_agent_settings

FOLDERS = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
           "Residential", "River", "SeaLake"]
NAMES = ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road", "Industrial Buildings",
         "Pasture Land", "Permanent Crop Land", "Residential Buildings", "River", "Sea or Lake"]
TEXT_AGENTS = "gpt3,vicuna,bert,sd,pixart,blip2,shikra"
OFFICIAL = "a centered satellite photo of a {}."
COOP = "a centered satellite photo of {}."


def eurosat(data_root, descriptions=True):
    """A EuroSAT split over empty image files (planning reads no pixels) and, by default, description files."""
    root = data_root / "eurosat"
    split = {"train": [], "val": [], "test": []}
    for label, folder in enumerate(FOLDERS):
        for index, name in enumerate(split):
            key = f"{folder}/{folder}_{index}.jpg"
            (root / "2750" / folder).mkdir(parents=True, exist_ok=True)
            (root / "2750" / key).write_bytes(b"")
            split[name].append([key, label, folder])
    (root / "split_zhou_EuroSAT.json").write_text(json.dumps(split))
    if descriptions:
        (root / "descriptions").mkdir()
        for agent in ("gpt3", "vicuna"):
            (root / "descriptions" / f"{agent}.json").write_text(json.dumps({n: [f"{agent} {n}."] for n in NAMES}))
    return root


def folder_dataset(data_root):
    for name in ("cat", "dog"):
        (data_root / "lab" / name).mkdir(parents=True)
        for index in range(4):
            (data_root / "lab" / name / f"{index}.png").write_bytes(b"")
    return "folder:lab"


def plan(tmp_path, dataset="eurosat", agents=TEXT_AGENTS, files=None, settings=None):
    """(jobs by name, lines said); t2i agents have one job here (base2novel trains on the base class set)."""
    options = ExtractOptions(dataset=dataset, data_root=tmp_path / "data", cache_root=tmp_path / "cache",
                             preset="tiny", agents=agents, shots=(1,),
                             descriptions={name: str(path) for name, path in (files or {}).items()},
                             agent_settings=settings or {})
    lines = []
    said = logging.Handler()
    said.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("pipelines.extraction")
    logger.addHandler(said)
    logger.setLevel(logging.INFO)
    try:
        jobs = build_jobs(options)
    finally:
        logger.removeHandler(said)
    return {job.spec.name: job for job in jobs}, lines, [job.spec.name for job in jobs]


def test_official_descriptions_and_templates_by_default(tmp_path):
    root = eurosat(tmp_path / "data")
    jobs, lines, order = plan(tmp_path)
    assert lines == [] and order.index("vicuna") < order.index("sd")
    for agent in ("gpt3", "vicuna"):
        assert jobs[agent].ctx.options == {"descriptions": str(root / "descriptions" / f"{agent}.json")}
    assert jobs["sd"].ctx.options == {"conditioning": "vicuna",
                                      "descriptions": str(root / "descriptions" / "vicuna.json")}
    for agent in ("pixart", "blip2", "shikra", "bert"):   # DS_TEMPLATE, not CoOp's template
        assert jobs[agent].ctx.template == OFFICIAL and jobs[agent].ctx.options == {}

    # each choice is a fingerprint field
    coop, _, _ = plan(tmp_path, settings={agent: {"template": "coop"} for agent in ("pixart", "blip2", "bert")})
    for agent in ("pixart", "blip2", "bert"):
        assert coop[agent].ctx.template == COOP
        assert planned_path(coop[agent], tmp_path) != planned_path(jobs[agent], tmp_path)
    template, _, _ = plan(tmp_path, settings={"sd": {"conditioning": "template"}})
    assert template["sd"].ctx.options == {"conditioning": "template"} and template["sd"].ctx.template == OFFICIAL
    assert planned_path(template["sd"], tmp_path) != planned_path(jobs["sd"], tmp_path)
    own = tmp_path / "mine.json"
    own.write_text(json.dumps({n: [f"my {n}."] for n in NAMES}))
    mine, _, _ = plan(tmp_path, files={"vicuna": own})   # sd reads whatever vicuna reads
    assert mine["sd"].ctx.options["descriptions"] == str(own)
    assert planned_path(mine["sd"], tmp_path) != planned_path(jobs["sd"], tmp_path)


def test_generated_vicuna_descriptions_use_the_dataset_questions_and_chain_into_sd(tmp_path):
    from extract.agents.vicuna import question_set

    eurosat(tmp_path / "data")
    generate = {"vicuna": {"descriptions": "generate"}}
    jobs, lines, order = plan(tmp_path, agents="sd,vicuna", settings=generate)
    questions = jobs["vicuna"].ctx.options["questions"]
    assert jobs["vicuna"].ctx.options == {"questions": questions} and questions == question_set("EuroSAT")
    assert "What are the differences between {} and other types of landscape in appearance?" in questions
    assert question_set("EuroSAT") != question_set("ImageNet") == question_set(None)
    vicuna_path = planned_path(jobs["vicuna"], tmp_path / "cache")
    assert order == ["vicuna", "sd"] and jobs["sd"].ctx.options == {
        "conditioning": "vicuna", "vicuna_cache": vicuna_path.name,
        "descriptions": str(vicuna_path / "files" / "descriptions.json")}
    more, _, _ = plan(tmp_path, agents="sd,vicuna", settings={"vicuna": {"descriptions": "generate",
                                                                          "generations": 3}})
    assert more["vicuna"].ctx.options["generations"] == 3
    assert planned_path(more["sd"], tmp_path) != planned_path(jobs["sd"], tmp_path)   # the chain follows vicuna

    alone, lines, _ = plan(tmp_path, agents="sd", settings=generate)   # vicuna neither run nor in the cache
    assert alone["sd"].ctx.options == {"conditioning": "template"}
    assert lines == [f"sd: no vicuna descriptions (vicuna generates them and is neither extracted here nor in the "
                     f"cache); conditioning on the template {OFFICIAL!r}"]

    with pytest.raises(ValueError, match="choose one"):
        plan(tmp_path, files={"vicuna": tmp_path / "x.json"}, settings=generate)
    with pytest.raises(ValueError, match="vicuna:generations applies to generated descriptions"):
        plan(tmp_path, settings={"vicuna": {"generations": 3}})


def test_datasets_without_official_files(tmp_path):
    name = folder_dataset(tmp_path / "data")
    jobs, lines, order = plan(tmp_path, dataset=name)
    assert "gpt3" not in jobs and lines[0] == ("gpt3: skipped, folder:lab has no official GPT-3 descriptions; "
                                               "pass --descriptions gpt3=FILE ({classname: [description, ...]})")
    assert "generic (ImageNet) question set" in lines[1] and len(lines) == 2
    from extract.agents.vicuna import question_set

    assert jobs["vicuna"].ctx.options == {"questions": question_set("ImageNet")}
    assert jobs["sd"].ctx.options["conditioning"] == "vicuna" and "vicuna_cache" in jobs["sd"].ctx.options
    assert jobs["pixart"].ctx.template == "a photo of a {}."
    own = tmp_path / "gpt3.json"
    own.write_text(json.dumps({"cat": ["a cat."], "dog": ["a dog."]}))
    jobs, lines, _ = plan(tmp_path, dataset=name, files={"gpt3": own})
    assert jobs["gpt3"].ctx.options == {"descriptions": str(own)} and not any("gpt3" in line for line in lines)


def test_missing_official_files_say_how_to_get_them(tmp_path):
    eurosat(tmp_path / "data", descriptions=False)
    for agents in ("gpt3", "vicuna", "sd"):
        with pytest.raises(ValueError, match="descriptions .*/eurosat/descriptions/.*json are missing; `transagent "
                                             "datasets prepare eurosat` fetches them"):
            plan(tmp_path, agents=agents)
    jobs, _, _ = plan(tmp_path, agents="sd,pixart", settings={"sd": {"conditioning": "template"}})
    assert sorted(jobs) == ["pixart", "sd"]


@pytest.mark.parametrize("settings, files, message", [
    ({"nope": {"x": 1}}, None, "--agent-option nope:...: unknown agent"),
    ({"dino": {"template": "coop"}}, None, "--agent-option dino:template: unknown option; dino takes none"),
    ({"sd": {"conditioning": "t5"}}, None, "sd:conditioning=t5: expected one of vicuna, template"),
    ({"vicuna": {"descriptions": "official-ish"}}, None, "expected one of official, generate"),
    ({}, {"bert": "x.json"}, "--descriptions bert: only gpt3 and vicuna read a descriptions file"),
])
def test_agent_options_are_checked_before_anything_runs(tmp_path, settings, files, message):
    eurosat(tmp_path / "data")
    with pytest.raises(ValueError, match=message):
        plan(tmp_path, settings=settings, files=files)


def test_agent_option_flag_parsing():
    parsed = parse_agent_settings(None, None, ["vicuna:descriptions=generate", "vicuna:generations=5",
                                               'vicuna:questions=["What is {}?"]', "pixart:template=coop"])
    assert parsed == {"vicuna": {"descriptions": "generate", "generations": 5, "questions": ["What is {}?"]},
                      "pixart": {"template": "coop"}}
    for bad in ("vicuna=generate", ":descriptions=generate", "vicuna:=x", "vicuna:descriptions"):
        with pytest.raises(click.BadParameter, match="AGENT:KEY=VALUE"):
            parse_agent_settings(None, None, [bad])


def test_strict_turns_a_text_skip_into_an_error(tmp_path):
    """gpt3 on a folder dataset without descriptions is skipped in one line; --strict refuses to skip it."""
    from click.testing import CliRunner

    from pipelines.cli import main

    name = folder_dataset(tmp_path / "data")
    args = ["extract", "--dataset", name, "--data-root", tmp_path / "data", "--cache-root", tmp_path / "cache",
            "--preset", "tiny", "--agents", "gpt3,bert", "--shots", "1", "--dry-run"]
    lenient = CliRunner().invoke(main, [str(arg) for arg in args])
    assert lenient.exit_code == 0, lenient.output
    assert "skipped 1 agent(s): gpt3: folder:lab has no official GPT-3 descriptions" in lenient.output
    strict = CliRunner().invoke(main, [str(arg) for arg in [*args, "--strict"]])
    assert strict.exit_code == 1 and "gpt3" in strict.output and "(--strict)" in strict.output, strict.output
