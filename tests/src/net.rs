//! Network paths a test can break: hosts of their own in network namespaces
//! (`ip netns`, one veth pair each to the test's namespace) and links between
//! the parts through a proxy in the test (cut, healed, slowed). Only
//! addresses the test creates are used (10.250.x.y), never anything beyond
//! the machine. Where namespaces cannot be made (no root, no `ip`), the same
//! parts run on loopback and the same links carry their traffic: the test
//! says which it ran.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// Runs `ip` with `args`; whether it succeeded.
fn ip(args: &[&str]) -> bool {
    Command::new("ip").args(args).output().is_ok_and(|o| o.status.success())
}

/// A command that runs `program` in the named namespace (`ip netns exec`,
/// which execs it: the child's pid is the program's), or here.
pub fn command_in(netns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match netns {
        None => Command::new(program),
        Some(name) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", name]).arg(program);
            cmd
        }
    }
}

/// A host of its own: a network namespace with one veth pair to the test's
/// namespace. Processes started in it (`command_in`) see only their own address
/// and the test's end of the pair (no forwarding: they reach the other
/// parts only through the test's links).
pub struct Host {
    pub name: String,
    /// The host's address (what the test connects to).
    pub addr: Ipv4Addr,
    /// The test's end of the pair (what the host connects to).
    pub peer: Ipv4Addr,
    inner_dev: String,
}

impl Host {
    /// A new host, or `None` where this machine cannot make namespaces.
    pub fn create(label: &str) -> Option<Host> {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        // Third octet: unique in this process; test binaries run one at a time.
        let subnet = (std::process::id() % 8) * 30 + n;
        if subnet > 254 {
            return None;
        }
        let tag = format!("{}{}", std::process::id() % 100_000, n);
        let name = format!("ocb-{label}-{tag}");
        let (outer, inner) = (format!("ocb{tag}o"), format!("ocb{tag}i"));
        let addr = Ipv4Addr::new(10, 250, subnet as u8, 2);
        let peer = Ipv4Addr::new(10, 250, subnet as u8, 1);
        let host = Host { name: name.clone(), addr, peer, inner_dev: inner.clone() };
        let made = ip(&["netns", "add", &name])
            && ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner])
            && ip(&["link", "set", &inner, "netns", &name])
            && ip(&["addr", "add", &format!("{peer}/24"), "dev", &outer])
            && ip(&["link", "set", &outer, "up"])
            && ip(&["netns", "exec", &name, "ip", "addr", "add", &format!("{addr}/24"), "dev", &inner])
            && ip(&["netns", "exec", &name, "ip", "link", "set", &inner, "up"])
            && ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        if !made {
            drop(host);
            let _ = ip(&["link", "del", &outer]);
            return None;
        }
        Some(host)
    }

    /// Cuts the host off: its end of the pair goes down, so packets to and
    /// from it are dropped (the test's route to it stays, marked linkdown, so
    /// nothing is sent anywhere else). Connections stay open, as in a real
    /// partition, and carry on when it heals if they have not timed out.
    pub fn partition(&self) {
        assert!(
            ip(&["netns", "exec", &self.name, "ip", "link", "set", &self.inner_dev, "down"]),
            "partition {}",
            self.name
        );
    }

    pub fn heal(&self) {
        assert!(ip(&["netns", "exec", &self.name, "ip", "link", "set", &self.inner_dev, "up"]), "heal {}", self.name);
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and with it ours.
        let _ = ip(&["netns", "del", &self.name]);
    }
}

struct LinkState {
    cut: AtomicBool,
    delay_ms: AtomicU64,
    healed: Notify,
}

/// A TCP link through the test: what one side sends reaches the other,
/// unless the link is cut (bytes are held, not refused: the sender sees a
/// silent peer, as in a partition, and everything flows again on heal) or
/// slowed (each chunk waits `delay` in each direction).
pub struct Link {
    pub addr: SocketAddr,
    state: Arc<LinkState>,
    accept: tokio::task::JoinHandle<()>,
}

impl Link {
    /// Listens on `listen` (port picked free) and carries every connection to `target`.
    pub async fn start(listen: IpAddr, target: SocketAddr) -> Link {
        let listener = TcpListener::bind(SocketAddr::new(listen, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state =
            Arc::new(LinkState { cut: AtomicBool::new(false), delay_ms: AtomicU64::new(0), healed: Notify::new() });
        let s = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    s.wait_open().await;
                    let Ok(server) = TcpStream::connect(target).await else { return };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pump(cr, sw, s.clone()), pump(sr, cw, s));
                });
            }
        });
        Link { addr, state, accept }
    }

    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
    }

    pub fn heal(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
        self.state.healed.notify_waiters();
    }

    /// Each chunk waits `delay` before it is passed on (zero: no delay).
    pub fn slow(&self, delay: Duration) {
        self.state.delay_ms.store(delay.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl LinkState {
    async fn wait_open(&self) {
        loop {
            let healed = self.healed.notified();
            if !self.cut.load(Ordering::SeqCst) {
                return;
            }
            healed.await;
        }
    }
}

async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, s: Arc<LinkState>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        s.wait_open().await;
        let delay = s.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
