#!/bin/sh
# Rendered by `cord-coord ops render` from examples/demo.yaml; change the config and render again.
# One managed spot job per worker: deploy.max_replicas of each pool.
set -eu
cd "$(dirname "$0")"
: "${CORD_REDIS_URL:?set CORD_REDIS_URL to the fleet Redis URL (with its password)}"
sky jobs launch -y -d -n cord-demo-alpha-1 --secret CORD_REDIS_URL alpha.yaml
sky jobs launch -y -d -n cord-demo-alpha-2 --secret CORD_REDIS_URL alpha.yaml
sky jobs launch -y -d -n cord-demo-alpha-3 --secret CORD_REDIS_URL alpha.yaml
sky jobs launch -y -d -n cord-demo-alpha-4 --secret CORD_REDIS_URL alpha.yaml
sky jobs launch -y -d -n cord-demo-beta-1 --secret CORD_REDIS_URL beta.yaml
sky jobs launch -y -d -n cord-demo-beta-2 --secret CORD_REDIS_URL beta.yaml
sky jobs launch -y -d -n cord-demo-beta-3 --secret CORD_REDIS_URL beta.yaml
sky jobs launch -y -d -n cord-demo-beta-4 --secret CORD_REDIS_URL beta.yaml
sky jobs launch -y -d -n cord-demo-gamma-1 --secret CORD_REDIS_URL gamma.yaml
sky jobs launch -y -d -n cord-demo-gamma-2 --secret CORD_REDIS_URL gamma.yaml
sky jobs launch -y -d -n cord-demo-gamma-3 --secret CORD_REDIS_URL gamma.yaml
sky jobs launch -y -d -n cord-demo-gamma-4 --secret CORD_REDIS_URL gamma.yaml
sky jobs launch -y -d -n cord-demo-meta-1 --secret CORD_REDIS_URL meta.yaml
sky jobs launch -y -d -n cord-demo-meta-2 --secret CORD_REDIS_URL meta.yaml
sky jobs launch -y -d -n cord-demo-meta-3 --secret CORD_REDIS_URL meta.yaml
sky jobs launch -y -d -n cord-demo-meta-4 --secret CORD_REDIS_URL meta.yaml
