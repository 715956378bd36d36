# GlomLab: the labeling app (port 8501, default) or the diagnosis viewer (port 7860).
#   docker build -t glomlab .
#   docker run -p 127.0.0.1:8501:8501 -v "$PWD/data:/app/data" glomlab           # labeling app
#   docker run -p 127.0.0.1:7860:7860 -v "$PWD/data:/app/data" -v "$PWD/runs:/app/runs" glomlab viewer
# Whole-slide images for the Slide workspace and the viewer: add -v /path/to/slides:/app/slides:ro
# (read from GLOM_SLIDES_DIR, set below).
# Inside the container the servers listen on 0.0.0.0 so the published port reaches them; publish
# to 127.0.0.1 on the host (as above) unless the network is meant to see them.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    GLOM_DB=sqlite:////app/data/glomlab.db \
    GLOM_SLIDES_DIR=/app/slides \
    STREAMLIT_BROWSER_GATHER_USAGE_STATS=false
WORKDIR /app

# CPU build of the pinned torch first (the default wheel carries several GB of CUDA libraries);
# requirements.txt's torch==2.14.1 / torchvision==0.29.1 are then already satisfied.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1
COPY requirements.txt pyproject.toml README.md ./
RUN pip install -r requirements.txt
COPY annotation_db/ annotation_db/
COPY core/ core/
COPY models/ models/
COPY app/ app/
COPY recipes/ recipes/
COPY .streamlit/ .streamlit/
RUN pip install --no-deps -e . && useradd --create-home glom && mkdir -p /app/data /app/runs && chown glom /app/data /app/runs
USER glom

EXPOSE 8501 7860
ENTRYPOINT ["/app/app/docker-entrypoint.sh"]
CMD ["label"]
