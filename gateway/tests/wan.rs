//! Forwarding over an emulated WAN that goes down and comes back.
//!
//! Failure modes guarded against: a link outage while an association is open hanging the
//! forwarder (no DIMSE/connect timeout) or losing the instances in flight; instances received
//! during the outage being refused or lost instead of queued; a status that does not show the
//! link down; a queue that does not drain once the link is back; stalls per message on a link
//! with latency (Nagle and delayed ACK, one round trip per PDU).
//!
//! Set-up (all made and removed by the test; it only talks to addresses it created): a network
//! namespace `dgw-wan-PID` joined to the host by a veth pair `dgwhPID` (host, 10.250.X.1/30) /
//! `dgwpPID` (namespace, 10.250.X.2/30), X picked unused. Orthanc runs inside the namespace
//! (`ip netns exec`); the gateway runs on the host and forwards to 10.250.X.2. An `unreachable`
//! route for 10.250.X.0/30 with a high metric keeps packets for these addresses from ever
//! leaving through the default route. Everything is removed by a guard, also on failure.
//!
//! The link: `tc qdisc ... netem delay 25ms loss 1% rate 100mbit` on both ends. Kernels built
//! without netem (CONFIG_NET_SCH_NETEM unset, as on the Firecracker VMs this suite runs on) get
//! the nearest equivalent they support, and the test says so: `tbf rate 100mbit` on both ends
//! for the rate, and in the namespace a TCP relay in front of Orthanc's DICOM port that delays
//! every chunk by 25 ms in each direction and, to mimic 1 % packet loss, holds a chunk back by
//! a 200 ms retransmission timeout with the probability that one of its segments was lost.
//!
//! The outage: the namespace end of the veth is set down (`ip link set dgwpPID down`), so the
//! host end has no carrier and packets vanish, as when a WAN drops (rather than failing fast).
//! Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN); without it the test prints why and skips.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use common::data::{self, FileInfo};
use common::orthanc::{
    counts, dest_status, in_netns, send_all, start_gateway, status, wait_counts, wait_until,
    Counts, Dest, Orthanc, PACS_AE,
};
use common::GatewayConfig;

/// Orthanc's DICOM port inside the namespace, and the relay's.
const ORTHANC_PORT: u16 = 4242;
const RELAY_PORT: u16 = 11112;
const ONE_WAY_DELAY: Duration = Duration::from_millis(25);
const LOSS: f64 = 0.01;
/// Linux's minimum retransmission timeout: what a lost segment costs.
const RTO: Duration = Duration::from_millis(200);

fn ip(args: &[&str]) -> Result<(), String> {
    run("ip", args)
}

fn run(prog: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {prog}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{prog} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn output(prog: &str, args: &[&str]) -> String {
    Command::new(prog)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// How the link is impaired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Emulation {
    /// `netem delay 25ms loss 1% rate 100mbit` on both ends.
    Netem,
    /// `tbf rate 100mbit` on both ends plus the delaying relay (no netem in this kernel).
    TbfAndRelay,
}

/// The namespace, the veth pair and the guard route; removed on drop.
struct Net {
    ns: String,
    host_if: String,
    peer_if: String,
    subnet: u8,
    guard_route: bool,
}

impl Net {
    /// Creates everything; `Err` only if the namespace itself cannot be made (no permission).
    fn create() -> Result<Net, String> {
        let pid = std::process::id();
        let ns = format!("dgw-wan-{pid}");
        if let Err(e) = ip(&["netns", "add", &ns]) {
            if !e.contains("File exists") {
                return Err(e);
            }
            // Left over by a killed earlier run with the same pid.
            let _ = ip(&["netns", "del", &ns]);
            ip(&["netns", "add", &ns])?;
        }
        let used = format!(
            "{}{}",
            output("ip", &["-4", "-o", "addr", "show"]),
            output("ip", &["-4", "route", "show", "table", "all"])
        );
        let start = u8::try_from(pid % 200).expect("small") + 20;
        let subnet = (0..200u8)
            .map(|i| 20 + (start - 20 + i) % 200)
            .find(|x| !used.contains(&format!("10.250.{x}.")))
            .expect("a free 10.250.X.0/30");
        let mut net = Net {
            ns,
            host_if: format!("dgwh{pid}"),
            peer_if: format!("dgwp{pid}"),
            subnet,
            guard_route: false,
        };
        net.setup()
            .unwrap_or_else(|e| panic!("network set-up failed: {e}"));
        Ok(net)
    }

    fn setup(&mut self) -> Result<(), String> {
        let (ns, h, p) = (self.ns.clone(), self.host_if.clone(), self.peer_if.clone());
        let net = format!("10.250.{}.0/30", self.subnet);
        ip(&["route", "add", "unreachable", &net, "metric", "4000"])?;
        self.guard_route = true;
        ip(&["link", "add", &h, "type", "veth", "peer", "name", &p])?;
        ip(&["link", "set", &p, "netns", &ns])?;
        ip(&["addr", "add", &format!("{}/30", self.host_ip()), "dev", &h])?;
        ip(&["link", "set", &h, "up"])?;
        ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"])?;
        ip(&[
            "netns",
            "exec",
            &ns,
            "ip",
            "addr",
            "add",
            &format!("{}/30", self.peer_ip()),
            "dev",
            &p,
        ])?;
        ip(&["netns", "exec", &ns, "ip", "link", "set", &p, "up"])?;
        Ok(())
    }

    fn host_ip(&self) -> String {
        format!("10.250.{}.1", self.subnet)
    }

    fn peer_ip(&self) -> String {
        format!("10.250.{}.2", self.subnet)
    }

    /// `tc` on the host end and (inside the namespace) on the namespace end.
    fn tc_both(&self, qdisc: &[&str]) -> Result<(), String> {
        let mut host = vec!["qdisc", "add", "dev", &self.host_if, "root"];
        host.extend_from_slice(qdisc);
        run("tc", &host)?;
        let mut peer = vec![
            "netns",
            "exec",
            &self.ns,
            "tc",
            "qdisc",
            "add",
            "dev",
            &self.peer_if,
            "root",
        ];
        peer.extend_from_slice(qdisc);
        ip(&peer)
    }

    fn impair(&self) -> Emulation {
        match self.tc_both(&["netem", "delay", "25ms", "loss", "1%", "rate", "100mbit"]) {
            Ok(()) => Emulation::Netem,
            Err(e) => {
                eprintln!(
                    "NOTE wan: netem is not available ({e}); emulating the WAN with tbf rate \
                     100mbit and a relay that delays 25 ms each way and stalls 200 ms per lost \
                     segment (1 %)"
                );
                self.tc_both(&["tbf", "rate", "100mbit", "burst", "64kb", "latency", "50ms"])
                    .unwrap_or_else(|e| panic!("tbf: {e}"));
                Emulation::TbfAndRelay
            }
        }
    }

    /// Sets the namespace end of the link up or down.
    fn link(&self, up: bool) {
        ip(&[
            "netns",
            "exec",
            &self.ns,
            "ip",
            "link",
            "set",
            &self.peer_if,
            if up { "up" } else { "down" },
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.ns]);
        let _ = ip(&["link", "del", &self.host_if]);
        if self.guard_route {
            let _ = ip(&[
                "route",
                "del",
                "unreachable",
                &format!("10.250.{}.0/30", self.subnet),
                "metric",
                "4000",
            ]);
        }
    }
}

/// The delaying TCP relay inside the namespace (see the module doc); stops accepting on drop.
struct Relay {
    stop: Arc<AtomicBool>,
}

impl Relay {
    fn start(ns: &str, listen: SocketAddr, target_port: u16) -> Relay {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        in_netns(ns, move || -> std::io::Result<()> {
            let l = TcpListener::bind(listen)?;
            l.set_nonblocking(true)?;
            // The accept loop runs on a thread spawned here, so it is in the namespace too and
            // its connections to Orthanc are made there.
            std::thread::spawn(move || accept_loop(&l, target_port, &flag));
            Ok(())
        })
        .expect("enter the namespace")
        .unwrap_or_else(|e| panic!("relay on {listen}: {e}"));
        Relay { stop }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn accept_loop(l: &TcpListener, target_port: u16, stop: &AtomicBool) {
    let mut seed = u64::from(std::process::id()) | 1;
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((client, _)) => {
                let Ok(()) = client.set_nonblocking(false) else {
                    continue;
                };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                pump(client, server, seed);
                pump(s2, c2, seed ^ 0x9E37_79B9_7F4A_7C15);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Copies `src` to `dst` through a delay line: each chunk is written [`ONE_WAY_DELAY`] after
/// it was read (plus [`RTO`] with the probability that one of its segments was lost), in order.
fn pump(src: TcpStream, dst: TcpStream, mut seed: u64) {
    let (tx, rx) = mpsc::channel::<Option<(Instant, Vec<u8>)>>();
    let mut reader = src;
    let Ok(src_ctl) = reader.try_clone() else {
        return;
    };
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut last_due = Instant::now();
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(None);
                    return;
                }
                Ok(n) => {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let r = (seed >> 11) as f64 / (1u64 << 53) as f64;
                    let p_lost = 1.0 - (1.0 - LOSS).powf(n as f64 / 1448.0);
                    let mut due = Instant::now() + ONE_WAY_DELAY;
                    if r < p_lost {
                        due += RTO;
                    }
                    due = due.max(last_due);
                    last_due = due;
                    if tx.send(Some((due, buf[..n].to_vec()))).is_err() {
                        return;
                    }
                }
            }
        }
    });
    std::thread::spawn(move || {
        let mut dst = dst;
        for item in rx {
            match item {
                Some((due, bytes)) => {
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    if dst.write_all(&bytes).is_err() {
                        let _ = src_ctl.shutdown(Shutdown::Both);
                        let _ = dst.shutdown(Shutdown::Both);
                        return;
                    }
                }
                None => {
                    let _ = dst.shutdown(Shutdown::Write);
                    return;
                }
            }
        }
    });
}

fn inspect_all(files: &[std::path::PathBuf]) -> Vec<FileInfo> {
    files.iter().map(|f| data::inspect(f)).collect()
}

fn assert_in_orthanc(orthanc: &Orthanc, sent: &[FileInfo]) {
    let have = orthanc.instance_map();
    for f in sent {
        let inst = have
            .get(&f.sop_instance_uid)
            .unwrap_or_else(|| panic!("{} is not in Orthanc", f.sop_instance_uid));
        assert_eq!(
            orthanc.dataset_checksum(&inst.id),
            f.checksum,
            "dataset of {} in Orthanc differs from the one sent",
            f.sop_instance_uid
        );
    }
}

#[test]
fn study_sent_during_a_wan_outage_is_queued_then_drains() {
    let net = match Net::create() {
        Ok(n) => n,
        Err(e) => {
            eprintln!(
                "SKIPPED wan: cannot create a network namespace ({e}); this test needs root (or \
                 CAP_NET_ADMIN and CAP_SYS_ADMIN)"
            );
            return;
        }
    };
    let emulation = net.impair();
    // Through the relay, Orthanc sees the gateway's associations come from its own loopback.
    let (gateway_host, dest_port) = match emulation {
        Emulation::Netem => (net.host_ip(), ORTHANC_PORT),
        Emulation::TbfAndRelay => ("127.0.0.1".to_owned(), RELAY_PORT),
    };
    let mut orthanc = Orthanc::in_netns(&net.ns, &gateway_host);
    orthanc.start();
    let _relay = (emulation == Emulation::TbfAndRelay).then(|| {
        Relay::start(
            &net.ns,
            SocketAddr::new(net.peer_ip().parse().expect("ip"), RELAY_PORT),
            ORTHANC_PORT,
        )
    });
    let mut dest = Dest::new("pacs", PACS_AE, &format!("{}:{dest_port}", net.peer_ip()));
    dest.connect_timeout_secs = 3;
    dest.dimse_timeout_secs = 5;
    // Keep the association open across the cut, so the cut hits an open association.
    dest.idle_close_secs = 60;
    let gw = start_gateway(GatewayConfig::default(), &dest.to_toml());

    // Over the WAN with the link up.
    let first = data::ct_series(&gw.scratch("first"), "a", 10, 256, 256);
    let first_sent = inspect_all(&first);
    let t0 = Instant::now();
    send_all(&gw, &first);
    wait_counts(
        &gw,
        "pacs",
        Counts {
            pending: 0,
            failed: 0,
            delivered: 10,
        },
        Duration::from_secs(60),
    );
    let first_took = t0.elapsed();

    // The link goes down; a study arrives meanwhile.
    net.link(false);
    let second = data::ct_series(&gw.scratch("second"), "b", 20, 256, 256);
    let second_sent = inspect_all(&second);
    let t_cut = Instant::now();
    send_all(&gw, &second);
    let acked_in = t_cut.elapsed();
    let last = std::cell::RefCell::new(serde_json::Value::Null);
    let st = wait_until(
        Duration::from_secs(60),
        || {
            format!(
                "link down and 20 pending expected; last status {:#}",
                last.borrow()
            )
        },
        || {
            let s = status(&gw);
            let d = dest_status(&s, "pacs").clone();
            *last.borrow_mut() = s.clone();
            (d["link"]["up"] == false
                && d["link"]["last_error"]
                    .as_str()
                    .is_some_and(|e| !e.is_empty())
                && d["pending"] == 20)
                .then_some(s)
        },
    );
    let detected = t_cut.elapsed();
    assert_eq!(orthanc.count(), 10, "nothing can have crossed the cut link");
    assert_eq!(counts(&st, "pacs").failed, 0);

    // The link comes back: the queue drains by itself.
    net.link(true);
    let t_up = Instant::now();
    wait_counts(
        &gw,
        "pacs",
        Counts {
            pending: 0,
            failed: 0,
            delivered: 30,
        },
        Duration::from_secs(120),
    );
    let drained = t_up.elapsed();
    assert_eq!(orthanc.count(), 30);
    assert_in_orthanc(&orthanc, &first_sent);
    assert_in_orthanc(&orthanc, &second_sent);
    eprintln!(
        "[figures] WAN ({emulation:?}): 10 x 128 KiB forwarded in {first_took:.2?} with the link \
         up; link cut: 20 acknowledged locally in {acked_in:.2?}, outage reported after \
         {detected:.2?} ({}); link back: drained in {drained:.2?}",
        dest_status(&st, "pacs")["link"]["last_error"]
    );
}
