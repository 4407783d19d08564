"""Flamingo as a trainer task: frozen ViT -> Perceiver Resampler -> GATED XATTN-DENSE blocks in a
frozen decoder LM, trained on a weighted mixture of image-text pairs and interleaved documents.

Dimension letters: b per-source batch, M media slots, S image side, T tokens.

Pieces (each in its one place):
  model       `vlm_jax.models.flamingo.Flamingo` (resampler, gated blocks, extra token rows)
  data        `vlm_jax.data.interleaved` sources, one batch of each per step
              (`make_mixture_iterator(nested=True)`): ``pairs`` (<image> caption <eoc>),
              ``docs`` (1..M images with captions and unattached text), ``nonce`` (in-context
              nonce-word episodes); batch = {source: dict(tokens i32[b, T], images
              f32[b, M, S, S, 3], media_valid bool[b, M])}
  loss        sum over sources of lambda_s * (masked next-token cross-entropy), the mask being
              open_flamingo's interleaved masking (`interleaved_loss_mask`); each source's loss
              and accuracy logged
  tokenizer   the word vocabulary of the training captions + the episode and filler words +
              the nonce words (``<workdir>/vocab.json``); ``<image>`` / ``<|endofchunk|>`` are the
              model's extra ids V and V + 1
  freezing    ``vision/..`` and the LM's own parameters (``model.freeze_vision`` /
              ``freeze_lm``); trainable: resampler, gated blocks, extra token rows
  evaluators  ``fewshot`` (nonce classification by class log-likelihood, shots x selection x
              trials, shot-curve PNG), ``caption`` (``evals.caption.shots`` fixed demonstrations + <image>, beam search until <eoc>),
              ``caption_blind`` (the same with no token seeing the image; ``evals.caption.blind_baseline``),
              ``fewshot_caption`` / ``fewshot_vqa`` (open-ended generation from k demonstrations,
              open_flamingo's ``<image>Output:`` and ``<image>Question:{q} Short answer:`` prompts,
              scored with the caption metrics / VQAv2 accuracy over shots x selection x trials)

``model.stage='lm'`` is stage 0 for the synthetic set, where no pretrained LM exists: the same
model trained text-only (images and their markers dropped) with everything but the LM's own
parameters frozen, so its ``lm`` subtree (gated blocks untouched at their init) seeds the
Flamingo stage through ``config.init.lm`` (source='checkpoint').
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models import flamingo as fl
from vlm_jax.tasks.base import Task

STAGES = ("flamingo", "lm")
SOURCES = ("pairs", "docs", "nonce", "qa", "mmc4")


class FlamingoTask(Task):
    name = "flamingo"

    def __init__(self, config, *, workdir=None, mesh=None):
        super().__init__(config, workdir=workdir, mesh=mesh)
        self._tokenizer = None
        self._model = None
        self._evaluators = None
        self.text_only = config.model.stage == "lm"

    # ------------------------------------------------------------------ tokenizer
    def _train_captions(self):
        from vlm_jax.data.datasets import get_dataset
        return get_dataset(self.config.data).meta("train").captions

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from vlm_jax.data.tokenizer import WordTokenizer
            paths = [os.path.join(self.workdir, "vocab.json")] if self.workdir else []
            lm = self.config.init.lm
            if lm.source == "checkpoint" and lm.path:    # the frozen LM's own vocabulary
                paths.insert(0, os.path.join(lm.path, "vocab.json"))
            for p in paths:
                if os.path.exists(p):
                    self._tokenizer = WordTokenizer.load(p)
                    break
            else:
                texts = self._base_texts() + [" ".join(self.nonce_pool())]
                self._tokenizer = WordTokenizer.build(texts, min_count=1, max_size=int(self.config.data.vocab_max_size))
            if self.workdir and not os.path.exists(os.path.join(self.workdir, "vocab.json")) and \
                    jax.process_index() == 0:
                os.makedirs(self.workdir, exist_ok=True)
                self._tokenizer.save(os.path.join(self.workdir, "vocab.json"))
        return self._tokenizer

    def _base_texts(self) -> list[str]:
        """Every text of the synthetic sources but the nonce words: captions, fillers, the nonce
        template, the training questions and answers in the VQA prompt, and the few-shot caption
        prompt (so that no prompt word is <unk>)."""
        from vlm_jax.data import interleaved
        from vlm_jax.data.datasets import get_dataset
        c = self.config
        texts = [t for caps in self._train_captions() for t in caps]
        qa = c.data.qa_template
        texts += [qa.format(q["question"], q["answer"]) for qs in get_dataset(c.data).meta("train").questions
                  for q in qs]
        prompts = [qa.format("", ""), c.evals.fewshot_caption.template.format("")]
        return texts + list(interleaved.FILLER) + [interleaved.NONCE_TEMPLATE.format("")] + prompts

    def nonce_pool(self) -> list[str]:
        """The nonce words: ``data.nonce_words`` CVC words absent from every other training text."""
        if getattr(self, "_nonce", None) is None:
            from vlm_jax.data import interleaved
            from vlm_jax.data.tokenizer import normalize
            seen = {w for t in self._base_texts() for w in normalize(t)}
            self._nonce = interleaved.nonce_words(int(self.config.data.nonce_words), exclude=seen)
        return self._nonce

    @property
    def lm_vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    # ------------------------------------------------------------------ model
    @property
    def model(self) -> fl.Flamingo:
        if self._model is None:
            from vlm_jax.config_lib import ConfigError
            want = int(self.config.model.lm.get("vocab_size", 0))
            if want and want != self.lm_vocab_size:
                raise ConfigError(f"config.model.lm.vocab_size={want} but the tokenizer has {self.lm_vocab_size} ids; "
                                  "set it to 0 (the tokenizer's) to train.")
            max_positions = max(self.token_len("docs"), self.token_len("nonce"), self.token_len("pairs")) + 8
            self._model = fl.Flamingo(model_config(self.config, vocab_size=self.lm_vocab_size,
                                                   max_positions=max_positions),
                                      dtype=jnp.dtype(self.config.train.dtype))
        return self._model

    @property
    def image_id(self) -> int:
        return self.model.config.image_id

    @property
    def eoc_id(self) -> int:
        return self.model.config.eoc_id

    def prepare(self) -> None:
        _ = self.model
        if self.mesh is not None:
            from vlm_jax.config_lib import ConfigError
            dp = int(self.mesh.shape.get("data", 1)) * int(self.mesh.shape.get("fsdp", 1))
            for name in self.active_sources():
                b = self.source_batch(name)
                if b % dp:
                    raise ConfigError(f"config.data.mixture.{name}.batch_size={b} is not divisible by the data-parallel "
                                      f"size {dp} (mesh data x fsdp); use a multiple of {dp}.")

    def checkpoint_meta(self) -> dict:
        return {"vocab_size": self.lm_vocab_size, "stage": self.config.model.stage}

    # ------------------------------------------------------------------ data
    def token_len(self, source: str) -> int:
        d = self.config.data
        if source == "pairs":
            return int(d.max_caption_len) + 4          # <bos> <image> words <eoc> <eos>
        return int(d.max_tokens)

    def max_images(self, source: str) -> int:
        d = self.config.data
        return {"pairs": 1, "docs": int(d.max_images), "nonce": int(d.nonce_shots), "qa": int(d.max_images),
                "mmc4": int(d.max_images)}[source]

    def source_batch(self, source: str) -> int:
        return int(self.config.data.mixture[source].batch_size)

    def _sources(self, split: str = "train"):
        from vlm_jax.data import interleaved
        from vlm_jax.data.datasets import get_dataset
        from vlm_jax.data.preprocess import preprocessor_for
        c, d = self.config, self.config.data
        ds = get_dataset(d)
        meta, images = ds.meta(split), ds.images(split)
        common = dict(images=images, preprocess=preprocessor_for(d), tokenizer=self.tokenizer, image_id=self.image_id,
                      eoc_id=self.eoc_id, image_size=int(d.image_size), seed=int(c.seed), text_only=self.text_only)
        out = {}
        out["pairs"] = interleaved.CaptionDocSource(meta.captions, max_images=1, max_tokens=self.token_len("pairs"),
                                                    **common)
        out["docs"] = interleaved.SyntheticDocSource(meta.captions, int(d.num_docs), max_images=int(d.max_images),
                                                     max_tokens=self.token_len("docs"), **common)
        out["nonce"] = interleaved.NonceEpisodeSource(interleaved.single_object_records(meta.objects), self.nonce_pool(),
                                                      int(d.nonce_way), int(d.num_docs),
                                                      max_images=int(d.nonce_shots),
                                                      max_tokens=self.token_len("nonce"), **common)
        if any(qs for qs in meta.questions):
            out["qa"] = interleaved.QADocSource(meta.questions, int(d.num_docs), str(d.qa_template),
                                                max_images=int(d.max_images), max_tokens=self.token_len("qa"), **common)
        if split == "train" and float(self.config.data.mixture.mmc4.weight) > 0:
            out["mmc4"] = interleaved.Mmc4DocSource(self._mmc4_records(), float(d.mmc4.threshold),
                                                    max_images=int(d.max_images), max_tokens=self.token_len("mmc4"),
                                                    **{k: v for k, v in common.items() if k != "images"})
        return out

    def _mmc4_records(self):
        """The prepared MMC4-format documents of ``data.mmc4.manual_dir`` (images left encoded)."""
        from vlm_jax.data.datasets import prepare_builder_once
        from vlm_jax.data.mmc4 import Mmc4Local, Mmc4Records
        d = self.config.data
        builder = prepare_builder_once(lambda: Mmc4Local(config="default", data_dir=d.data_dir or None),
                                       d.mmc4.manual_dir)
        return Mmc4Records(builder, "train")

    def train_iterator(self, *, process_index=None, process_count=None):
        from vlm_jax.data.mixture import MixtureSource, make_mixture_iterator
        srcs = self._sources("train")
        missing = [n for n in SOURCES if float(self.config.data.mixture[n].weight) > 0 and n not in srcs]
        if missing:
            from vlm_jax.config_lib import ConfigError
            raise ConfigError(f"config.data.mixture.{missing[0]}.weight > 0 but the {self.config.data.name} training "
                              "split has no questions to build it from; set its weight to 0.")
        mix = [MixtureSource(name, srcs[name], weight=float(self.config.data.mixture[name].weight),
                             batch_size=self.source_batch(name))
               for name in SOURCES if float(self.config.data.mixture[name].weight) > 0]
        return make_mixture_iterator(mix, global_batch_size=int(self.config.train.batch_size),
                                     seed=int(self.config.seed), process_index=process_index,
                                     process_count=process_count, worker_count=int(self.config.data.worker_count),
                                     nested=True)

    def active_sources(self) -> tuple[str, ...]:
        return tuple(s for s in SOURCES if float(self.config.data.mixture[s].weight) > 0)

    def example_batch(self, batch_size: int):
        s = int(self.config.data.image_size)
        full = batch_size == int(self.config.train.batch_size)
        out = {}
        for name in self.active_sources():
            b = self.source_batch(name) if full else batch_size
            ex = {"tokens": np.zeros((b, self.token_len(name)), np.int32)}
            if not self.text_only:
                m = self.max_images(name)
                ex["images"] = np.zeros((b, m, s, s, 3), np.float32)
                ex["media_valid"] = np.zeros((b, m), bool)
            out[name] = ex
        return out

    # ------------------------------------------------------------------ variables
    def init(self, rng, batch):
        first = batch[self.active_sources()[0]]
        tokens = jnp.asarray(first["tokens"])
        s = int(self.config.data.image_size)
        images = jnp.zeros((tokens.shape[0], 1, s, s, 3), jnp.float32)
        return {"params": self.model.init({"params": rng}, tokens, images)["params"], "model_state": {}}

    # ------------------------------------------------------------------ loss
    def source_loss(self, params, ex, *, train: bool, rng):
        """-> (mean next-token cross-entropy, accuracy, target count) of one source's batch."""
        from vlm_jax.objectives.captioning import masked_cross_entropy
        tokens = ex["tokens"]
        pad = int(self.tokenizer.pad_id)
        valid = tokens != pad
        rngs = {"dropout": rng} if train else {}
        if self.text_only:
            out = self.model.apply({"params": params}, tokens, attention_mask=valid, deterministic=not train,
                                   rngs=rngs)
            mask = (valid[:, 1:])
        else:
            out = self.model.apply({"params": params}, tokens, ex["images"], attention_mask=valid,
                                   media_valid=ex["media_valid"], deterministic=not train, rngs=rngs)
            mask = fl.interleaved_loss_mask(tokens, self.image_id, self.eoc_id, pad)[:, :-1]
        return masked_cross_entropy(out.logits[:, :-1], tokens[:, 1:], mask)

    def loss_fn(self, params, model_state, batch, rng, *, train):
        total, metrics, ntok = 0.0, {}, 0.0
        for k, name in enumerate(self.active_sources()):      # one dropout stream per source
            x = self.source_loss(params, batch[name], train=train, rng=jax.random.fold_in(rng, k))
            lam = float(self.config.data.mixture[name].weight)
            total = total + lam * x.loss
            metrics[f"{name}/loss"] = x.loss
            metrics[f"{name}/accuracy"] = x.accuracy
            ntok = ntok + x.num_tokens
        metrics["loss"] = total
        metrics["num_tokens"] = ntok
        return total, (metrics, model_state)

    def param_groups(self):
        from vlm_jax.optim import ParamGroup
        m = self.config.model
        if self.text_only:
            # stage 0: only the LM's own parameters learn; the gated blocks, resampler, ViT and the
            # extra rows keep their init (they are not part of the text-only model)
            return (ParamGroup("not_the_lm", pattern=r"(?!lm/).*|lm/(?:.*/)?inserted_\d+/.*", trainable=False),)
        return fl.param_groups(freeze_vision=bool(m.freeze_vision), freeze_lm=bool(m.freeze_lm))

    # ------------------------------------------------------------------ evaluation
    def caption_demonstrations(self, shots: int):
        """The fixed demonstrations of the caption prompt: the first ``shots`` training images with
        their first caption -> (images f32[shots, S, S, 3], prompt ids ``<bos> (<image> caption
        <eoc>)*shots <image>``)."""
        from vlm_jax.data import interleaved
        from vlm_jax.data.datasets import get_dataset
        from vlm_jax.data.preprocess import preprocessor_for
        ds = get_dataset(self.config.data)
        meta, images, prep = ds.meta("train"), ds.images("train"), preprocessor_for(self.config.data)
        chunks = [interleaved.Chunk(meta.captions[r][0]) for r in range(shots)]
        chunks.append(interleaved.Chunk("", end=False))
        ids = interleaved.encode_interleaved(self.tokenizer, chunks, image_id=self.image_id, eoc_id=self.eoc_id)
        s = int(self.config.data.image_size)
        demo = np.stack([prep(images[r]) for r in range(shots)]) if shots else np.zeros((0, s, s, 3), np.float32)
        return demo, np.asarray(ids, np.int32)

    def predict_caption(self, params, model_state, batch, *, beam_size: int, max_len: int, length_penalty: float,
                        shots: int = 0, blind: bool = False):
        """``<bos> (<image> caption <eoc>)*shots <image>`` -> beam search until ``<|endofchunk|>`` ->
        {tokens i32[B, max_len] (the word tokenizer's eos in place of <eoc>), scores f32[B]}: Flamingo's
        few-shot captioning with ``shots`` fixed demonstrations (`caption_demonstrations`; the
        mixture's nonce episodes also start with ``<image>``, so without demonstrations the prompt
        does not say which task is asked). ``blind``: the same model and prompt with every media slot
        marked empty (no token sees any image: the cross-attention output is 0, the gated FFW still
        runs), the blind baseline."""
        from vlm_jax import generate as gen
        tok = self.tokenizer
        b = batch["image"].shape[0]
        demo, ids = self.caption_demonstrations(shots)
        demos = jnp.broadcast_to(jnp.asarray(demo)[None], (b,) + demo.shape)               # [B, shots, S, S, 3]
        images = jnp.concatenate([demos, batch["image"][:, None]], axis=1)                  # [B, shots + 1, S, S, 3]
        latents = self.model.apply({"params": params}, images, method=fl.Flamingo.encode_images)
        prompt = jnp.asarray(np.tile(ids[None], (b, 1)))
        res = gen.generate(self.model, params, prompt, max_new_tokens=max_len, eos_id=self.eoc_id, pad_id=tok.pad_id,
                           strategy="beam" if beam_size > 1 else "greedy", beam_size=beam_size,
                           length_penalty=length_penalty,
                           prefill_inputs={"latents": latents},     # media keys/values projected once
                           row_inputs={"media_valid": jnp.full(latents.shape[:2], not blind)})
        tokens = res.tokens[:, 0]
        tokens = jnp.where(tokens == self.eoc_id, tok.eos_id, tokens)
        return {"tokens": tokens, "scores": res.scores[:, 0]}

    def dialogue(self, params, *, batch_size: int = 1, max_len: int | None = None,
                 max_images: int | None = None) -> "Dialogue":
        """A multi-image `Dialogue` with this task's model and ids (cache of ``max_len`` tokens,
        default the model's positions; ``max_images`` default ``data.max_images``)."""
        d = self.config.data
        return Dialogue(self.model, params, batch_size=batch_size,
                        max_len=int(max_len or self.model.config.lm.max_positions),
                        max_images=int(max_images or d.max_images), image_id=self.image_id, eoc_id=self.eoc_id,
                        pad_id=self.tokenizer.pad_id)

    def make_episodes(self, trial_seed: int, num: int, *, split: str | None = None):
        """``num`` nonce classification episodes of the eval split (`ClassificationEpisode`): per
        episode ``data.nonce_way`` colours with fresh nonce names, ``evals.fewshot.support_size``
        labelled single-object images and one query image of one of those colours (never in the
        support set)."""
        from vlm_jax.data import interleaved
        from vlm_jax.data.datasets import get_dataset
        from vlm_jax.data.preprocess import preprocessor_for
        c, e = self.config, self.config.evals.fewshot
        ds = get_dataset(c.data)
        split = split or e.split
        by = {col: r for col, r in interleaved.single_object_records(ds.meta(split).objects).items() if len(r) >= 2}
        images, prep = ds.images(split), preprocessor_for(c.data)
        colors, words = sorted(by), self.nonce_pool()
        k, n_sup = int(c.data.nonce_way), int(e.support_size)
        if len(colors) < k:
            from vlm_jax.config_lib import ConfigError
            raise ConfigError(f"evals.fewshot: the {split!r} split has single-object images (>= 2 each) of only "
                              f"{len(colors)} colours {colors}, fewer than data.nonce_way={k}; use a larger split "
                              f"(data.num_{split}) or a smaller nonce_way.")
        rng = np.random.default_rng([int(c.seed), 7, int(trial_seed)])
        cache: dict[int, np.ndarray] = {}

        def img(r):
            if r not in cache:
                cache[r] = prep(images[int(r)])
            return cache[r]

        out = []
        for _ in range(num):
            cls = [colors[int(i)] for i in rng.choice(len(colors), size=k, replace=False)]
            names = tuple(words[int(i)] for i in rng.choice(len(words), size=k, replace=False))
            label = int(rng.integers(k))
            q = int(rng.choice(by[cls[label]]))
            labels = rng.integers(k, size=n_sup)
            recs = []
            for lab in labels:
                pool = by[cls[int(lab)]]
                pool = pool[pool != q]
                recs.append(int(rng.choice(pool)))
            out.append(interleaved.ClassificationEpisode(
                support_images=np.stack([img(r) for r in recs]), support_labels=labels.astype(np.int32),
                query_image=img(q), label=label, class_names=names))
        return out

    def evaluators(self):
        if self._evaluators is None:
            import functools

            c = self.config
            tok = self.tokenizer
            evs = []
            if not self.text_only:
                from vlm_jax.evaluation.caption_eval import CaptionEvaluator
                from vlm_jax.evaluation.fewshot import FewShotClassificationEvaluator
                f = c.evals.fewshot
                evs.append(FewShotClassificationEvaluator(
                    name="fewshot", every=int(f.every), model=self.model, tokenizer=tok, image_id=self.image_id,
                    eoc_id=self.eoc_id, make_episodes=self.make_episodes, shots=tuple(int(s) for s in f.shots),
                    trials=int(f.trials), selection=tuple(f.selection), num_episodes=int(f.num_episodes),
                    use_cache=bool(f.use_cache), batch_size=int(f.batch_size), mesh=self.mesh, seed=int(c.seed)))
                e = c.evals.caption

                def load_split():
                    from vlm_jax.data import pipeline
                    return pipeline.load_eval_split(c, tok, e.split)

                predict = functools.partial(self.predict_caption, beam_size=int(e.beam_size), max_len=int(e.max_len),
                                            length_penalty=float(e.length_penalty), shots=int(e.shots))
                for name, blind in (("caption", False), ("caption_blind", True))[:1 + bool(e.blind_baseline)]:
                    evs.append(CaptionEvaluator(
                        name=name, every=int(e.every), predict=functools.partial(predict, blind=blind),
                        input_keys=("image",), load_split=load_split, tokenizer=tok, batch_size=int(e.batch_size),
                        max_examples=int(e.max_examples), num_figures=0, grid=1, mesh=self.mesh,
                        meteor=bool(e.meteor)))
                evs += self.fewshot_generation_evaluators()
            self._evaluators = evs
        return self._evaluators

    def fewshot_generation_evaluators(self) -> list:
        """'fewshot_caption' (``<image>Output:``) and 'fewshot_vqa' (``<image>Question:{q} Short
        answer:``): open-ended few-shot generation over shots x selection x trials
        (`vlm_jax.evaluation.fewshot_generation`), each where ``evals.<name>.enabled``."""
        from vlm_jax.data import pipeline
        from vlm_jax.evaluation.fewshot_generation import FewShotGenerationEvaluator
        c, tok, out = self.config, self.tokenizer, []
        for name, kind in (("fewshot_caption", "caption"), ("fewshot_vqa", "vqa")):
            e = c.evals[name]
            if not e.enabled:
                continue
            out.append(FewShotGenerationEvaluator(
                name=name, every=int(e.every), kind=kind, model=self.model, tokenizer=tok, image_id=self.image_id,
                eoc_id=self.eoc_id, load_split=lambda e=e: pipeline.load_eval_split(c, tok, e.split),
                load_support=lambda e=e: pipeline.load_eval_split(c, tok, e.support_split),
                template=str(e.template or (c.data.qa_template if kind == "vqa" else "")),
                shots=tuple(int(k) for k in e.shots), trials=int(e.trials), selection=tuple(e.selection),
                num_queries=int(e.num_queries), support_size=int(e.support_size), beam_size=int(e.beam_size),
                max_len=int(e.max_len), batch_size=int(e.batch_size), mesh=self.mesh, seed=int(c.seed),
                **({"demo_caption": str(e.demo_caption), "meteor": bool(e.meteor)} if kind == "caption" else {})))
        return out


# The dialogue's compiled calls, at module level with the model static (Flax modules hash by
# their config): every `Dialogue` of the same model and shapes reuses them, so a new conversation
# compiles nothing; a turn of a new width (or number of new images) compiles once.
@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _dialogue_start(model, batch_size, max_len, params, media_valid, latents):
    from vlm_jax import generate as gen
    return gen.session_start(model, params, batch_size=batch_size, max_len=max_len,
                             row_inputs={"media_valid": media_valid}, cache_inputs={"latents": latents})


@functools.partial(jax.jit, static_argnums=0)
def _dialogue_encode(model, params, images):
    return model.apply({"params": params}, images, method=fl.Flamingo.encode_images)


@functools.partial(jax.jit, static_argnums=0)
def _dialogue_extend(model, params, session, tokens, mask, media_valid, call_inputs):
    from vlm_jax import generate as gen
    return gen.session_extend(model, params, session, tokens, mask=mask, row_inputs={"media_valid": media_valid},
                              call_inputs=call_inputs)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _dialogue_respond(model, params, session, rng, kw):
    from vlm_jax import generate as gen
    return gen.session_respond(model, params, session, rng=rng, **dict(kw))


class Dialogue:
    """A multi-image conversation with a `Flamingo` model through one decoding session
    (`vlm_jax.generate.session_*`): every turn's tokens are written to the KV cache once, and each
    image is encoded (ViT + resampler) and its keys/values projected in every gated block once,
    when its turn arrives (`Flamingo(media_offset=...)` writes them at the image's slots of the
    cross-attention cache made for ``max_images``); replies decode from the cache as it stands.
    Each text token sees the most recent preceding image, as in training.

      d = Dialogue(model, params, batch_size=B, max_len=S, max_images=M, image_id=.., eoc_id=.., pad_id=..)
      d.add(tokens [B, T], images [B, Mn, S, S, C])   # a turn with Mn new images (Mn <image> markers a row)
      reply = d.reply(max_new_tokens=L)               # [B, L]; written with the next add()
      d.add(next_tokens); ...

    ``tokens`` may be padded anywhere (``mask`` 1 = real) but the last column must be real.
    `FlamingoTask.dialogue` makes one with the task's ids."""

    def __init__(self, model: fl.Flamingo, params, *, batch_size: int, max_len: int, max_images: int,
                 image_id: int, eoc_id: int, pad_id: int):
        c = model.config
        self.model, self.params, self.image_id, self.eoc_id, self.pad_id = model, params, image_id, eoc_id, pad_id
        self.max_images, self.num_images = int(max_images), 0
        self.media_valid = np.zeros((batch_size, max_images), bool)
        shape = (batch_size, max_images, c.resampler.num_latents, c.resampler.width)
        self.session = _dialogue_start(model, batch_size, max_len, params, jnp.asarray(self.media_valid),
                                       jnp.zeros(shape, model.dtype))
        self._reply = None           # (tokens, mask) of the last reply, written with the next turn

    def add(self, tokens, images=None, *, mask=None) -> None:
        """Append a turn (after the last reply, if any): ``tokens [B, T]`` with one ``<image>`` marker
        a row per new image, ``images [B, Mn, S, S, C]`` (or None)."""
        from vlm_jax import generate as gen
        tokens = np.asarray(tokens, np.int32)
        mask = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask, bool)
        mn = 0 if images is None else int(np.shape(images)[1])
        markers = ((tokens == self.image_id) & mask).sum(1)
        if not (markers == mn).all():
            raise ValueError(f"Dialogue.add: {mn} new image(s) but the rows hold {markers.tolist()} <image> markers; "
                             "give one marker per new image in every row.")
        if self.num_images + mn > self.max_images:
            raise ValueError(f"Dialogue.add: {self.num_images} + {mn} images exceed max_images={self.max_images}; "
                             "start the dialogue with a larger max_images.")
        if self._reply is not None:
            rt, rm = self._reply
            tokens, mask = np.concatenate([rt, tokens], 1), np.concatenate([rm, mask], 1)
            self._reply = None
        used, cap = gen.session_used(self.session), self.session["key_valid"].shape[1]
        if used + tokens.shape[1] + (self.session["pending"] is not None) - 1 > cap:
            raise ValueError(f"Dialogue.add: a turn of {tokens.shape[1]} tokens overflows the dialogue's cache of "
                             f"{cap} tokens ({used} used); start it with a larger max_len.")
        call_inputs = {}
        if mn:
            latents = _dialogue_encode(self.model, self.params, jnp.asarray(images))        # [B, Mn, R, D] only
            call_inputs = {"latents": latents, "media_offset": jnp.int32(self.num_images)}
            self.media_valid[:, self.num_images:self.num_images + mn] = True
            self.num_images += mn
        self.session = _dialogue_extend(self.model, self.params, self.session, jnp.asarray(tokens),
                                        jnp.asarray(mask), jnp.asarray(self.media_valid), call_inputs)

    def reply(self, *, max_new_tokens: int, eos_id: int | None = None, **decode_kw) -> np.ndarray:
        """Decode a reply -> tokens ``i32[B, max_new_tokens]`` (eos, default ``<|endofchunk|>``, then
        pad); the reply up to its eos is kept and written with the next `add`. ``decode_kw``:
        `vlm_jax.generate.session_respond`'s strategy, beam_size, length_penalty, ..."""
        from vlm_jax import generate as gen
        eos = self.eoc_id if eos_id is None else int(eos_id)
        rng = decode_kw.pop("rng", None)                      # a key (traced); the rest is static
        kw = tuple(sorted(dict(decode_kw, max_new_tokens=int(max_new_tokens), eos_id=eos, pad_id=self.pad_id).items()))
        cache_end = gen.session_used(self.session)
        if cache_end + max_new_tokens > self.session["key_valid"].shape[1]:
            raise ValueError(f"Dialogue.reply: max_new_tokens={max_new_tokens} overflows the dialogue's cache of "
                             f"{self.session['key_valid'].shape[1]} tokens ({cache_end} used); start it with a larger "
                             "max_len.")
        res = _dialogue_respond(self.model, self.params, self.session, rng, kw)
        tokens = np.asarray(res.tokens[:, 0])
        ended = np.cumsum(tokens == eos, axis=1) - (tokens == eos)           # eos seen strictly before
        self._reply = (tokens, ended == 0)                                    # the reply through its eos
        return tokens


def model_config(config, *, vocab_size: int, max_positions: int) -> fl.FlamingoConfig:
    """The `FlamingoConfig` of ``config.model``: ViT (``model.vision``) -> Perceiver Resampler of
    the vision width -> OPT-shaped `DecoderLM` (``model.lm``; ``vocab_size`` ids, learned positions
    for ``model.lm.max_positions`` or, when that is 0, ``max_positions``) with GATED XATTN-DENSE
    blocks before every ``model.xattn_every``-th layer. What the task trains and what
    benchmarks/flamingo_param_counts.py counts for the paper layouts."""
    from vlm_jax.layers.decoder_lm import DecoderLMConfig
    from vlm_jax.layers.vit import ViTConfig
    m = config.model
    v, r, x, lmc = m.vision, m.resampler, m.xattn, m.lm
    vis = ViTConfig(image_size=int(config.data.image_size), patch_size=int(v.patch_size), hidden_size=int(v.width),
                    num_layers=int(v.num_layers), num_heads=int(v.num_heads), mlp_dim=int(v.mlp_dim),
                    norm_eps=1e-6, pool="none")
    res = fl.PerceiverResamplerConfig(width=int(v.width), depth=int(r.depth), num_heads=int(r.num_heads),
                                      head_dim=int(r.head_dim), num_latents=int(r.num_latents),
                                      mlp_dim=int(r.mlp_dim), activation=str(r.activation), max_frames=1)
    xattn = fl.GatedXAttnConfig(num_heads=int(x.num_heads), head_dim=int(x.head_dim), mlp_dim=int(x.mlp_dim),
                                activation=str(x.activation))
    lm = DecoderLMConfig(vocab_size=int(vocab_size), width=int(lmc.width), num_layers=int(lmc.num_layers),
                         num_heads=int(lmc.num_heads), mlp_dim=int(lmc.mlp_dim),
                         max_positions=int(lmc.get("max_positions", 0)) or int(max_positions))
    return fl.FlamingoConfig(vision=vis, resampler=res, lm=lm, xattn=xattn, xattn_every=int(m.xattn_every),
                             feature_layer=int(m.feature_layer), vision_tokens=str(m.vision_tokens))


def validate(config) -> None:
    from vlm_jax.config_lib import ConfigError, check_choice, check_positive, validate_data_section
    if str(config.get("variant", "")).startswith("paper_"):
        raise ConfigError(f"configs/flamingo.py:{config.variant} is a shape reference of the paper's model (its parameter "
                          "counts: python benchmarks/flamingo_param_counts.py); no Chinchilla / NFNet-F6 weights nor "
                          "M3W data exist for it. Train configs/flamingo.py:synthetic, or evaluate Flamingo-style "
                          "weights through the IDEFICS importer (README).")
    check_choice(config, "model.stage", STAGES)
    check_positive(config, "data.image_size", "data.max_caption_len", "data.max_images", "data.max_tokens",
                   "data.num_docs", "data.nonce_way", "data.nonce_words", "data.nonce_shots", "model.xattn_every",
                   "model.lm.width", "model.lm.num_layers", "model.lm.num_heads", "model.lm.mlp_dim",
                   "evals.fewshot.trials", "evals.fewshot.num_episodes", "evals.fewshot.support_size")
    for name in SOURCES:
        w = float(config.data.mixture[name].weight)
        if w < 0:
            raise ConfigError(f"config.data.mixture.{name}.weight={w} must be >= 0 (0 drops the source).")
        check_positive(config, f"data.mixture.{name}.batch_size")
    if float(config.data.mixture.mmc4.weight) > 0 and not config.data.mmc4.manual_dir:
        raise ConfigError("config.data.mixture.mmc4.weight > 0 but config.data.mmc4.manual_dir is empty: point it at "
                          "the folder of MMC4-format *.jsonl documents and their images/ (vlm_jax/data/mmc4.py).")
    if float(config.data.mixture.mmc4.weight) > 0 and not os.path.isdir(config.data.mmc4.manual_dir):
        raise ConfigError(f"config.data.mmc4.manual_dir={config.data.mmc4.manual_dir!r} is not a directory.")
    if not any(float(config.data.mixture[n].weight) > 0 for n in SOURCES):
        raise ConfigError(f"config.data.mixture: every source weight is 0; give one of {SOURCES} a weight > 0.")
    if config.model.lm.width % config.model.lm.num_heads:
        raise ConfigError(f"config.model.lm.width={config.model.lm.width} is not divisible by "
                          f"num_heads={config.model.lm.num_heads}.")
    if max(config.evals.fewshot.shots) > config.evals.fewshot.support_size:
        raise ConfigError(f"config.evals.fewshot.shots={tuple(config.evals.fewshot.shots)} asks for more "
                          f"demonstrations than support_size={config.evals.fewshot.support_size}.")
    if config.data.nonce_words < config.data.nonce_way:
        raise ConfigError(f"config.data.nonce_words={config.data.nonce_words} < nonce_way={config.data.nonce_way}.")
    if config.model.stage == "flamingo" and config.model.freeze_lm:
        lm = config.init.lm
        if not (lm.source in ("checkpoint", "hf") and lm.path):
            raise ConfigError("Flamingo keeps its LM frozen (model.freeze_lm=True) but config.init.lm seeds nothing, so "
                              "it would read a frozen random LM: train the stage-0 LM first and pass it, e.g. "
                              "--config configs/flamingo.py:synthetic,lm=runs/flamingo_lm (after "
                              "train.py --config configs/flamingo.py:lm_synthetic --workdir runs/flamingo_lm), or set "
                              "--config.model.freeze_lm=false.")
    validate_data_section(config)


def make_task(config, *, workdir=None, mesh=None) -> FlamingoTask:
    return FlamingoTask(config, workdir=workdir, mesh=mesh)
