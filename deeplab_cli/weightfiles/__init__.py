"""Weight files, one module per idea:

- `formats`: .safetensors and PyTorch state dicts: safe loading, foreign key layouts, checks, saving (`Weights`);
- `caffe`: the authors' .caffemodel without Caffe (`deeplab weights convert`), and deploy prototxts;
- `cache`: the cache directory, where weights are found, sha256 and the trust record of fetched models;
- `manifest`: the known models (the repository's weights/manifest.json);
- `fetch`: downloads with integrity (`deeplab weights fetch`) and the list of known and cached models;
- `info`: what a weights file of any format holds (`deeplab weights info`).
"""
