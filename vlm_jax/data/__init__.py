"""Datasets and input pipelines (a leaf package: TFDS, grain, PIL, tokenizers; never imported
by models).

  pipeline.py       entry points of the caption pipeline: validate_data_config /
                    get_tokenizer / make_train_iterator / load_eval_split (docs/interfaces.md)
  datasets.py       config.data validation (its docstring lists the fields), TFDS builder
                    lookup, prepare-once across processes, per-split sources / metadata,
                    encoded-image access
  preprocess.py     ImagePreprocessor: decode, resize + centre crop, normalise
  train_input.py    CaptionPairSource (image, caption, image_id), BlindImage, the training loader
  eval_input.py     EvalSplit: references / objects / questions and padded image batches
  mixture.py        weighted mixtures of grain sources (per-example or nested per-source batches)
  processes.py      per-process shard / batch arithmetic, grain worker setup
  tokenizer_api.py  the Tokenizer protocol shared by every tokenizer + padding helpers
  tokenizer.py      WordTokenizer (<pad>=0 <bos>=1 <eos>=2 <unk>=3), built from captions
  pretrained_tokenizer.py
                    PretrainedTokenizer: BERT WordPiece / GPT-2, OPT byte-level BPE /
                    T5 Unigram from a local tokenizer.json, with added special tokens
  synthetic.py      SyntheticShapes TFDS builder (colored shapes, captions, VQA, boxes);
                    COLORS / SHAPES attribute vocabularies for the evaluation code
  karpathy.py       KarpathyCaptions TFDS builder (COCO / Flickr8k / Flickr30k from manual_dir)
  common.py         shared feature spec and image decoding / resizing helpers
"""
