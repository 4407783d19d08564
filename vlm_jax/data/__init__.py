"""Datasets and input pipelines (a leaf package: TFDS, grain, PIL; never imported by models).

  synthetic.py  SyntheticShapes TFDS builder (colored shapes, captions, VQA, boxes);
                COLORS / SHAPES attribute vocabularies for the evaluation code
  karpathy.py   KarpathyCaptions TFDS builder (COCO / Flickr8k / Flickr30k from manual_dir)
  tokenizer.py  WordTokenizer (<pad>=0 <bos>=1 <eos>=2 <unk>=3)
  pipeline.py   get_tokenizer / make_train_iterator / load_eval_split (docs/interfaces.md);
                its docstring lists the config.data fields
  common.py     shared feature spec and image decoding / resizing helpers
"""
