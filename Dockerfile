# tvproxy container: mount your config at /etc/tvproxy/tvproxy.toml (and userlist.txt beside it).
#   docker build -t tvproxy .
#   docker run -v $PWD/conf:/etc/tvproxy -p 6432:6432 tvproxy
FROM python:3.11-slim

RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-client \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/tvproxy
COPY pyproject.toml README.md ./
COPY tvproxy ./tvproxy
COPY conf ./conf
RUN pip install --no-cache-dir . \
    && mkdir -p /etc/tvproxy \
    && cp conf/tvproxy.toml conf/userlist.txt /etc/tvproxy/ \
    && useradd --system --no-create-home --shell /usr/sbin/nologin tvproxy

# Inside a container the proxy must listen on all interfaces to be reachable; every other
# setting comes from the mounted file (or more TVPROXY_<SECTION>_<KEY> variables).
ENV TVPROXY_PROXY_LISTEN_ADDR=0.0.0.0
EXPOSE 6432
USER tvproxy
CMD ["tvproxy", "serve", "-c", "/etc/tvproxy/tvproxy.toml"]
