//! The integration tests, in one binary (one link instead of one per file): each module is
//! one concern, run against the real brokers of this machine (`NATS_URL` / `AMQP_URL`) or the
//! binary itself; [`common`] is their harness.

mod common;

mod admin;
mod amqp_broker;
mod amqp_cluster;
mod amqp_quorum;
mod bridge_contract;
mod cli;
mod consumers;
mod deploy_configs;
mod deploy_files;
mod deploy_monitoring;
mod disk_full;
mod dlq_amqp;
mod dlq_nats;
mod dlq_purge;
mod hostile;
mod http_limits;
mod logs;
mod message_ttl;
mod nats_ack_timeout;
mod nats_auth;
mod nats_bridge;
mod nats_cluster;
mod nats_topology;
mod ops;
mod poison;
mod quarantine;
mod readme;
mod refusals;
mod reload;
mod send_test;
mod spool;
mod spool_amqp;
mod state;
mod state_cluster;
mod state_sdk;
mod sweeper_amqp;
mod sweeper_nats;
mod sweeper_per_app;
mod tracing;
mod webhook_fuzz;
