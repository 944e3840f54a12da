"""Vicuna-7B v1.5 class descriptions, encoded by the frozen student CLIP text encoder like the GPT-3 ones.

By default the descriptions are the official ones (`template/<Dataset>_prompts.json`, fetched by `transagent
datasets prepare`, passed as option 'descriptions'): the paper's numbers were made with them, the generation script
was never released (reference §3.2), and the LLM is then never loaded. Without that option the LLM generates them:
every question of the question set (option 'questions'; the dataset's own official set is chosen by the caller,
the ImageNet one is the default) is asked in Vicuna's chat format (the official chat settings), and 10 answers are
sampled independently per question, as the official counts imply (10 x the dataset's questions per class). Each
sample is seeded by (class name, question, sample index), so a resumed run, or one in another class order, gives the
same text. The answers are stored with the cache (descriptions.json).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from extract.agents.base import AgentSpec, LoadRequest
from extract.families.language import ClipTextEncoder, check_options, read_descriptions, tiny_tokenizer
from extract.hub import Source, hub_commit
from extract.loading import from_pretrained, load_model, seeded, torch_dtype

SOURCE = Source(hub_id="lmsys/vicuna-7b-v1.5")
OPTIONS = ("descriptions", "questions", "generations", "max_new_tokens", "temperature", "top_p")
# official texts, shipped with the package: knowledge_extraction/chat_templates.py and vicuna.json of the release
QUESTION_SETS = json.loads(Path(__file__).with_name("vicuna-questions.json").read_text(encoding="utf-8"))["questions"]
CHAT = json.loads(Path(__file__).with_name("vicuna-chat-config.json").read_text(encoding="utf-8"))
GENERIC_QUESTIONS = "ImageNet"   # the question set of datasets without their own (folder, synthetic)
QUESTIONS = tuple(QUESTION_SETS[GENERIC_QUESTIONS])
CHAT_TEMPLATE = CHAT["system_prompt"] + " USER: {question} ASSISTANT:"   # FastChat's vicuna_v1.1 format
# FastChat's sampling defaults (temperature 0.7, no top-p / top-k cut); the official values were not released
GENERATION = {"questions": list(QUESTIONS), "generations": 10, "max_new_tokens": 77, "temperature": 0.7, "top_p": 1.0}
# initializer_range 0.2 (not 0.02) so that the random tiny LLM's answers depend on the question and class name
TINY_LLM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 4, "max_position_embeddings": 512, "initializer_range": 0.2}
TINY_CONFIG = {"llm": TINY_LLM, "tokenizer": "character-level, built in code",
               "generation": {"generations": 2, "max_new_tokens": 12}}


def question_set(coop_name: str | None) -> list[str]:
    """The official questions the descriptions of a dataset (by its CoOp name) were generated from; the generic
    (ImageNet) set for a dataset without its own."""
    return list(QUESTION_SETS.get(coop_name or "", QUESTION_SETS[GENERIC_QUESTIONS]))


def sample_seed(classname: str, question: str, index: int) -> int:
    """The RNG seed of one sampled answer: a function of (class name, question template, sample index) only."""
    digest = hashlib.sha256(json.dumps([classname, question, index]).encode()).digest()
    return int.from_bytes(digest[:8], "big")


class VicunaRuntime:
    def __init__(self, encoder: ClipTextEncoder, request: LoadRequest):
        self.encoder, self.request = encoder, request
        self.dim = encoder.dim
        self.generation = {**GENERATION, **(TINY_CONFIG["generation"] if request.tiny else {})}
        self.source = {"source": "tiny-random" if request.tiny else (request.source or SOURCE).describe()}
        self._llm = None
        self._answers: dict[tuple[str, str], list[str]] = {}

    def descriptions(self, classnames: list[str], ctx) -> dict[str, list[str]]:
        check_options(ctx, OPTIONS, "vicuna")
        if "descriptions" in ctx.options:
            return read_descriptions(ctx.options["descriptions"], classnames)
        settings = self.settings(ctx)
        return {name: self.answers(name, settings) for name in classnames}

    def class_features(self, classnames: list[str], ctx):
        return self.encoder.class_features(self.descriptions(classnames, ctx), classnames)

    def settings(self, ctx) -> dict:
        settings = {**self.generation, **{key: ctx.options[key] for key in GENERATION if key in ctx.options}}
        questions = settings["questions"]
        if (not isinstance(questions, list) or not questions
                or not all(isinstance(q, str) and q.count("{}") == 1 for q in questions)):
            raise ValueError(f"vicuna questions must be a list of strings with exactly one '{{}}', got {questions!r}")
        for key in ("generations", "max_new_tokens"):
            if isinstance(settings[key], bool) or not isinstance(settings[key], int) or settings[key] < 1:
                raise ValueError(f"vicuna option {key!r} must be a positive integer, got {settings[key]!r}")
        for key, low, high in (("temperature", 0.0, None), ("top_p", 0.0, 1.0)):
            value = settings[key]
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= low
                    or (high is not None and value > high)):
                raise ValueError(f"vicuna option {key!r} must be a number in ({low}, {high or 'inf'}], got {value!r}")
        return settings

    def answers(self, classname: str, settings: dict) -> list[str]:
        """Every answer to every question about `classname` (memoised: compute and extra_files share them)."""
        memo_key = (classname, json.dumps(settings, sort_keys=True))
        if memo_key not in self._answers:
            texts = [text for question in settings["questions"] for text in self.ask(classname, question, settings)]
            if not texts:
                raise ValueError(f"vicuna gave only empty answers for {classname!r}")
            self._answers[memo_key] = texts
        return self._answers[memo_key]

    def ask(self, classname: str, question: str, settings: dict) -> list[str]:
        """`generations` independent samples of the answer to `question` about `classname`, each from its own seed
        (empty answers are dropped)."""
        import torch

        model, tokenizer = self.llm()
        prompt = tokenizer(CHAT_TEMPLATE.format(question=question.format(classname)),
                           return_tensors="pt").to(self.request.device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        devices = list(range(torch.cuda.device_count())) if str(self.request.device).startswith("cuda") else []
        answers = []
        for index in range(settings["generations"]):
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                torch.manual_seed(sample_seed(classname, question, index))
                out = model.generate(**prompt, do_sample=True, num_beams=1, temperature=settings["temperature"],
                                     top_p=settings["top_p"], top_k=0, repetition_penalty=1.0,
                                     max_new_tokens=settings["max_new_tokens"], pad_token_id=pad,
                                     eos_token_id=tokenizer.eos_token_id)
            answers.append(" ".join(tokenizer.decode(out[0, prompt["input_ids"].shape[1]:],
                                                     skip_special_tokens=True).split()))
        return [answer for answer in answers if answer]

    def preflight(self):
        """What `agents check` loads beyond `load`: the LLM, when descriptions are generated rather than read."""
        if "descriptions" not in self.request.options:
            self.llm()

    def llm(self):
        if self._llm is None:
            self._llm = load_llm(self.request)
            if not self.request.tiny:
                self.source["commit"] = hub_commit(self.request.source or SOURCE)
        return self._llm


def load_llm(request: LoadRequest):
    """(causal LM, tokenizer); the tiny one is a 2-layer LLaMA with a character-level tokenizer built in code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if request.tiny:
        tokenizer = tiny_tokenizer("<s> $A", unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
        config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY_LLM)
        with seeded(request.seed):
            model = LlamaForCausalLM(config)
    else:
        source = request.source or SOURCE
        tokenizer = from_pretrained(AutoTokenizer.from_pretrained, source, "vicuna")
        model = load_model(AutoModelForCausalLM, source, "vicuna", dtype=torch_dtype(request.dtype))
    return model.to(request.device).eval().requires_grad_(False), tokenizer


def load(request: LoadRequest) -> VicunaRuntime:
    return VicunaRuntime(ClipTextEncoder(request.student, request.device), request)


SPEC = AgentSpec(
    name="vicuna",
    family="language",
    source=SOURCE,
    preprocessing={
        "space": "student",  # class features in the student's text space: stage 2 uses them for L_LAC
        "descriptions": "option 'descriptions' (the official file by default) or generated by the LLM",
        "chat_template": CHAT_TEMPLATE, "stop_token_ids": CHAT["stop_token_ids"],
        "generation": {**GENERATION, "decoding": "sampling (top_k off), each answer seeded by sha256 of "
                                                 "[class name, question, index], questions by option 'questions'"},
        "text": "every answer to every question, whitespace-collapsed; empty answers dropped",
        "encoder": "frozen student CLIP text encoder (open_clip, fp32, 77-token context)",
        "pooling": "mean of un-normalised description features, then L2-normalised",
    },
    emits=("class_features",),
    load=load,
    tiny_config=TINY_CONFIG,
    description="Vicuna class descriptions (official file, or generated by Vicuna-7B v1.5), encoded by the student's "
                "CLIP text encoder",
)
