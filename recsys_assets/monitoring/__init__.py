"""Monitoring of the pipeline: drift reports and the Prometheus Pushgateway for batch-job signals."""
