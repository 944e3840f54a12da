"""Which text each agent reads (reference §3.2-3.7): official descriptions, generated ones, or a prompt template.

- gpt3: the official GPT-3 descriptions (ProText) that `datasets prepare` fetches to <dataset>/descriptions/gpt3.json,
  or `--descriptions gpt3=FILE`; on a dataset without official files (folder, synthetic without its file) it is
  skipped with one line saying so.
- vicuna: the official Vicuna descriptions (<dataset>/descriptions/vicuna.json) or FILE, as the paper's numbers
  were made with them. `--agent-option vicuna:descriptions=generate` has Vicuna-7B generate them from the dataset's
  own question set; a dataset without official files always generates, with the generic (ImageNet) questions.
- sd: as the official `LLM_TEMPLATE: True`, conditioned on the per-class mean feature of vicuna's descriptions:
  the same file, or vicuna's cache when vicuna generates (extraction then runs sd after vicuna). Where no vicuna
  descriptions exist it falls back to the template, and its fingerprint says which it used.
- pixart, blip2, shikra, bert (and sd's template): the official per-dataset template (`transagent_template`,
  DS_TEMPLATE); `AGENT:template=coop` takes CoOp's `template` instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from extract.agents.vicuna import question_set

DESCRIPTION_AGENTS = ("gpt3", "vicuna")
TEMPLATE_CHOICES = ("transagent", "coop")
TEMPLATE_AGENTS = ("sd", "pixart", "blip2", "shikra", "bert")
# --agent-option keys per agent -> allowed values (None: any value; the agent checks it)
SETTINGS = {
    "vicuna": {"descriptions": ("official", "generate"), "questions": None, "generations": None,
               "max_new_tokens": None, "temperature": None, "top_p": None},
    "sd": {"conditioning": ("vicuna", "template"), "template": TEMPLATE_CHOICES},
    **{agent: {"template": TEMPLATE_CHOICES} for agent in ("pixart", "blip2", "shikra", "bert")},
}


@dataclass
class TextPlan:
    template: str                                   # ctx.template
    options: dict = field(default_factory=dict)     # ctx.options
    skip: str | None = None                         # the agent is left out, and why (one line)
    note: str | None = None                         # one line for the user about the choice made
    from_vicuna_cache: bool = False                 # sd: conditioned on the descriptions vicuna generates


def check_settings(settings: dict[str, dict], known_agents, files: dict[str, str] | None = None) -> None:
    """--agent-option AGENT:KEY=VALUE names a known agent, a key it takes and, where listed, an allowed value;
    --descriptions names a description agent."""
    others = sorted(set(files or {}) - set(DESCRIPTION_AGENTS))
    if others:
        raise ValueError(f"--descriptions {', '.join(others)}: only {' and '.join(DESCRIPTION_AGENTS)} read a "
                         f"descriptions file (sd reads vicuna's)")
    for agent, values in settings.items():
        if agent not in known_agents:
            raise ValueError(f"--agent-option {agent}:...: unknown agent; known agents: {', '.join(known_agents)}")
        allowed = SETTINGS.get(agent, {})
        for key, value in values.items():
            if key not in allowed:
                raise ValueError(f"--agent-option {agent}:{key}: unknown option; {agent} takes "
                                 f"{', '.join(sorted(allowed)) or 'none'}")
            if allowed[key] is not None and value not in allowed[key]:
                raise ValueError(f"--agent-option {agent}:{key}={value}: expected one of {', '.join(allowed[key])}")


def description_file(dataset, agent: str) -> Path:
    """Where `datasets prepare` puts an agent's official descriptions (and where a lab may put its own)."""
    return Path(dataset.root) / "descriptions" / f"{agent}.json"


def has_official(dataset, agent: str) -> bool:
    return any(source.description_agent == agent for source in dataset.info.sources)


def plan_texts(dataset, agent: str, files: dict[str, str], settings: dict[str, dict]) -> TextPlan:
    """The text plan of one agent. `files`: --descriptions AGENT=FILE; `settings`: --agent-option values."""
    own = dict(settings.get(agent, {}))
    if agent == "gpt3":
        return _gpt3(dataset, files)
    if agent == "vicuna":
        return _vicuna(dataset, files, own)
    if agent in TEMPLATE_AGENTS:
        template = dataset.template if own.get("template") == "coop" else dataset.transagent_template
        if agent == "sd" and own.get("conditioning", "vicuna") == "vicuna":
            vicuna = _vicuna(dataset, files, dict(settings.get("vicuna", {})))
            if "descriptions" in vicuna.options:
                return TextPlan(template, {"conditioning": "vicuna", "descriptions": vicuna.options["descriptions"]})
            return TextPlan(template, {"conditioning": "vicuna"}, from_vicuna_cache=True)
        return TextPlan(template, {"conditioning": "template"} if agent == "sd" else {})
    return TextPlan(dataset.template)


def _missing(dataset, agent: str) -> ValueError:
    path = description_file(dataset, agent)
    generate = ", or --agent-option vicuna:descriptions=generate" if agent == "vicuna" else ""
    return ValueError(f"{agent}: the official descriptions {path} are missing; `transagent datasets prepare "
                      f"{dataset.name}` fetches them (so does `transagent extract`), or pass --descriptions "
                      f"{agent}=FILE{generate}")


def _given_file(dataset, agent: str, files: dict[str, str]) -> str | None:
    if agent in files:
        return str(files[agent])
    path = description_file(dataset, agent)
    return str(path) if path.is_file() else None


def _gpt3(dataset, files) -> TextPlan:
    path = _given_file(dataset, "gpt3", files)
    if path is not None:
        return TextPlan(dataset.template, {"descriptions": path})
    if has_official(dataset, "gpt3"):
        raise _missing(dataset, "gpt3")
    return TextPlan(dataset.template, skip=f"gpt3: skipped, {dataset.name} has no official GPT-3 descriptions; "
                                           f"pass --descriptions gpt3=FILE ({{classname: [description, ...]}})")


def _vicuna(dataset, files, own: dict) -> TextPlan:
    mode = own.pop("descriptions", "official")
    if mode == "generate":
        if "vicuna" in files:
            raise ValueError("--descriptions vicuna=FILE and --agent-option vicuna:descriptions=generate: choose one")
        return TextPlan(dataset.template, {"questions": question_set(dataset.info.coop_name), **own})
    if own:
        raise ValueError(f"--agent-option vicuna:{sorted(own)[0]} applies to generated descriptions; add "
                         f"--agent-option vicuna:descriptions=generate")
    path = _given_file(dataset, "vicuna", files)
    if path is not None:
        return TextPlan(dataset.template, {"descriptions": path})
    if has_official(dataset, "vicuna"):
        raise _missing(dataset, "vicuna")
    return TextPlan(dataset.template, {"questions": question_set(None)},
                    note=f"vicuna: {dataset.name} has no official Vicuna descriptions; Vicuna generates them from "
                         f"the generic (ImageNet) question set")


def needed_descriptions(agents, files: dict[str, str], settings: dict[str, dict]) -> tuple[str, ...]:
    """The agents whose official description files an extraction of `agents` reads (what to fetch first)."""
    needed = []
    if "gpt3" in agents and "gpt3" not in files:
        needed.append("gpt3")
    vicuna_reads_file = settings.get("vicuna", {}).get("descriptions", "official") == "official"
    sd_reads_vicuna = "sd" in agents and settings.get("sd", {}).get("conditioning", "vicuna") == "vicuna"
    if ("vicuna" in agents or sd_reads_vicuna) and vicuna_reads_file and "vicuna" not in files:
        needed.append("vicuna")
    return tuple(needed)
