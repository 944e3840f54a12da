"""Vicuna-7B v1.5 answering questions about each class; its answers are encoded like the GPT-3 descriptions.

The official code shipped Vicuna descriptions but not the generation script (reference §3.2): we ask the official
question templates in Vicuna's chat format and decode deterministically (greedy for one answer per question, beam
search returning the best N beams for N answers), so a rerun gives the same text. The answers are stored with
the cache (descriptions.json). A descriptions file given as option 'descriptions' (e.g. the official
template/<Dataset>_prompts.json) replaces generation and the LLM is never loaded.
"""
from __future__ import annotations

import json

from extract.agents._loading import from_pretrained, hub_commit, load_model, seeded, torch_dtype
from extract.agents.base import AgentSpec, LoadRequest, Source
from extract.families.language import ClipTextEncoder, check_options, read_descriptions, tiny_tokenizer

SOURCE = Source(hub_id="lmsys/vicuna-7b-v1.5")
OPTIONS = ("descriptions", "questions", "generations", "max_new_tokens")
# the official generic question set (knowledge_extraction/chat_templates.py, ImageNet/EuroSAT style)
QUESTIONS = (
    "What is the distinct characteristic of {}?",
    "What features does {} possess?",
    "What does {} look like?",
    "What are the differences between {} and other objects in appearance?",
    "A description of an image of {}:",
)
CHAT_TEMPLATE = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions. USER: {question} ASSISTANT:")
GENERATION = {"questions": list(QUESTIONS), "generations": 10, "max_new_tokens": 77}
# initializer_range 0.2 (not 0.02) so that the random tiny LLM's answers depend on the question and class name
TINY_LLM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 4, "max_position_embeddings": 512, "initializer_range": 0.2}
TINY_CONFIG = {"llm": TINY_LLM, "tokenizer": "character-level, built in code",
               "generation": {"generations": 2, "max_new_tokens": 12}}


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
        if not questions or not all(isinstance(q, str) and q.count("{}") == 1 for q in questions):
            raise ValueError(f"vicuna questions must be strings with exactly one '{{}}', got {questions!r}")
        for key in ("generations", "max_new_tokens"):
            if not isinstance(settings[key], int) or settings[key] < 1:
                raise ValueError(f"vicuna option {key!r} must be a positive integer, got {settings[key]!r}")
        return settings

    def answers(self, classname: str, settings: dict) -> list[str]:
        """Every answer to every question about `classname` (memoised: compute and extra_files share them)."""
        memo_key = (classname, json.dumps(settings, sort_keys=True))
        if memo_key not in self._answers:
            texts = [text for question in settings["questions"]
                     for text in self.ask(question.format(classname), settings)]
            if not texts:
                raise ValueError(f"vicuna gave only empty answers for {classname!r}")
            self._answers[memo_key] = texts
        return self._answers[memo_key]

    def ask(self, question: str, settings: dict) -> list[str]:
        import torch

        model, tokenizer = self.llm()
        prompt = tokenizer(CHAT_TEMPLATE.format(question=question), return_tensors="pt").to(self.request.device)
        beams = settings["generations"]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        with torch.no_grad():
            out = model.generate(**prompt, do_sample=False, num_beams=beams, num_return_sequences=beams,
                                 max_new_tokens=settings["max_new_tokens"], pad_token_id=pad)
        answers = tokenizer.batch_decode(out[:, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
        return [" ".join(answer.split()) for answer in answers if answer.strip()]

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
        "chat_template": CHAT_TEMPLATE,
        "generation": {**GENERATION, "decoding": "greedy (1 answer) / beam search returning the best N beams"},
        "text": "every answer to every question, whitespace-collapsed",
        "encoder": "frozen student CLIP text encoder (open_clip, fp32, 77-token context)",
        "pooling": "mean of un-normalised description features, then L2-normalised",
    },
    emits=("class_features",),
    load=load,
    tiny_config=TINY_CONFIG,
    description="Vicuna-7B v1.5 class descriptions (stored in the cache), encoded by the student's CLIP text encoder",
)
