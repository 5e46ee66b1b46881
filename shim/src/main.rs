//! `containerd-shim-msb-v2`: the containerd runtime shim (task API v2) that runs each
//! container in an msb-vmm sandbox. containerd starts it as runtime `io.containerd.msb.v2`.

mod rootfs;
mod service;
mod spec;

use std::sync::Arc;

use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, DeleteResponse, ExitSignal, Flags, StartOpts};

/// The runtime name containerd knows us by.
const RUNTIME: &str = "io.containerd.msb.v2";

struct Shim {
    namespace: String,
    exit: Arc<ExitSignal>,
}

impl containerd_shim::Shim for Shim {
    type T = service::Service;

    fn new(_runtime_id: &str, args: &Flags, config: &mut Config) -> Self {
        // The sandbox library waits for its own children; a SIGCHLD reaper calling
        // waitpid(-1) would steal their statuses.
        config.no_reaper = true;
        if args.action.is_empty() {
            // The serving shim: our tracing subscriber writes containerd's log FIFO (and
            // carries the shim crate's `log` records too).
            config.no_setup_logger = true;
            init_logging(args.debug);
        }
        Shim {
            namespace: args.namespace.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, containerd_shim::Error> {
        // Containers of one CRI pod go to one shim, which runs them in one sandbox (the
        // runc shim groups by the same annotation). containerd runs `start` in the bundle.
        let grouping = oci_spec::runtime::Spec::load("config.json")
            .ok()
            .and_then(|s| s.annotations().clone())
            .and_then(|a| a.get(spec::CRI_SANDBOX_ID).cloned())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| opts.id.clone());
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        // The bundle's `address` file is how the serving shim (and `delete`) find the socket
        // to remove when it ends.
        containerd_shim::synchronous::util::write_address(&address)?;
        Ok(address)
    }

    /// containerd's clean-up after a shim that died: its socket and our mounts in the bundle go.
    fn delete_shim(&mut self) -> Result<DeleteResponse, containerd_shim::Error> {
        if let Ok(address) = containerd_shim::synchronous::util::read_address() {
            let path = address.trim_start_matches("unix://");
            // A shim that still answers serves other containers of the pod: its socket stays.
            if !path.is_empty() && std::os::unix::net::UnixStream::connect(path).is_err() {
                let _ = std::fs::remove_file(path);
            }
        }
        let root = std::env::current_dir()
            .map(|d| d.join("rootfs"))
            .unwrap_or_default();
        // Not a mount point (a `root.path` bundle, or unmounted already): left alone.
        rootfs::unmount(&root);
        Ok(DeleteResponse {
            exit_status: 137,
            exited_at: containerd_shim::protos::protobuf::MessageField::some(
                containerd_shim::util::timestamp().unwrap_or_default(),
            ),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        service::Service::new(&self.namespace, self.exit.clone(), publisher)
    }
}

/// Logs to the `log` FIFO containerd made in the bundle (the shim's working directory); it
/// shows them in its own log. `$MSB_LOG` filters (default `info`, `debug` with `-debug`).
fn init_logging(debug: bool) {
    let Ok(fifo) = std::fs::OpenOptions::new().write(true).open("log") else {
        return;
    };
    let default = if debug { "debug" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MSB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(fifo))
        .try_init();
}

fn main() {
    containerd_shim::run::<Shim>(RUNTIME, None);
}
