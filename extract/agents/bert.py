"""A BERT-family sentence encoder (all-MiniLM-L6-v2 by default): the official per-dataset template per class,
mean-pooled over real tokens and L2-normalised, in the encoder's own space ([C, 384]); stage 2 uses its class
similarities. The official code has no BERT agent although the paper lists one (reference §3.0 row 7)."""
from __future__ import annotations

from extract.agents.base import AgentSpec, LoadRequest
from extract.families.language import check_options, tiny_tokenizer
from extract.hub import Source, resolved_source
from extract.loading import KeyAllowance, from_pretrained, load_model, seeded

SOURCE = Source(hub_id="sentence-transformers/all-MiniLM-L6-v2")
ALLOWANCE = KeyAllowance(unexpected=("pooler.dense.*",),
                         reason="the pooler is not run (features are masked means of the last hidden state)")
MAX_LENGTH = 256
TINY_CONFIG = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
               "max_position_embeddings": MAX_LENGTH, "tokenizer": "character-level, built in code"}


class BertRuntime:
    def __init__(self, model, tokenizer, device: str = "cpu", source: dict | None = None):
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer, self.device = tokenizer, device
        self.dim = model.config.hidden_size
        self.source = source or {}

    def descriptions(self, classnames: list[str], ctx):
        return None

    def class_features(self, classnames: list[str], ctx):
        import torch
        import torch.nn.functional as F

        check_options(ctx, (), "bert")
        if "{}" not in ctx.template:
            raise ValueError(f"template {ctx.template!r} has no '{{}}' for the class name")
        texts = [ctx.template.format(name) for name in classnames]
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        batch = {name: value.to(self.device) for name, value in batch.items()}
        with torch.no_grad():
            hidden = self.model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1).cpu().numpy()


def tiny_bert_tokenizer():
    return tiny_tokenizer("[CLS] $A [SEP]", unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                          sep_token="[SEP]")


def load(request: LoadRequest) -> BertRuntime:
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    source = request.source or SOURCE
    if request.tiny:
        tokenizer = tiny_bert_tokenizer()
        config = {key: value for key, value in TINY_CONFIG.items() if key != "tokenizer"}
        with seeded(request.seed):
            model = BertModel(BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **config),
                              add_pooling_layer=False)
        return BertRuntime(model, tokenizer, request.device, {"source": "tiny-random", "seed": request.seed})
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, source, "bert")
    model = load_model(AutoModel, source, "bert", ALLOWANCE, add_pooling_layer=False)
    return BertRuntime(model, tokenizer, request.device, resolved_source(source))


SPEC = AgentSpec(
    name="bert",
    family="language",
    source=SOURCE,
    preprocessing={
        "space": "own",  # class features in the encoder's own space: stage 2 uses them for L_REL
        "text": "the official per-dataset template (DS_TEMPLATE) per class",
        "tokens": f"truncated to {MAX_LENGTH}",
        "pooling": "mean over real tokens (attention mask) of the last hidden state, L2-normalised",
    },
    emits=("class_features",),
    load=load,
    tiny_config=TINY_CONFIG,
    description="Sentence-encoder (BERT family) features of the class prompts, in the encoder's own space",
    allowance=ALLOWANCE,
)
