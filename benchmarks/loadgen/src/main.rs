//! `loadgen`: the load generator and the plain-Rust servers (the ceilings) of ferroloop's
//! network benchmarks (`benchmarks/run.py` drives them; see `benchmarks/README.md`).
//!
//! ```text
//! loadgen client --addr tcp:127.0.0.1:PORT|unix:/path --conns N --size BYTES --duration SECS
//!                [--warmup SECS] [--server-pid PID] [--tls CA.pem]
//! loadgen echo-server --addr tcp:127.0.0.1:PORT|unix:/path [--tls-cert CERT --tls-key KEY]
//! loadgen http-server --addr tcp:127.0.0.1:PORT|unix:/path
//! loadgen idle --addr tcp:127.0.0.1:PORT|unix:/path --conns N [--ping BYTES]
//! ```
//!
//! `client` opens N connections and keeps exactly one message of SIZE bytes in flight on each:
//! it sends the message, reads SIZE bytes back, checks every byte against what it sent, and
//! sends the next one. Each connection has its own pseudo-random pattern and every message
//! starts at a different offset in it, so an echo that mixes up connections or replays an
//! older message fails the check. Single-threaded, on epoll (mio). After the warm-up it
//! measures for the duration and prints one JSON line: requests/s, latency percentiles (µs),
//! errors, its own CPU time (getrusage), the whole machine's busy CPU time (`/proc/stat`, so
//! the harness can tell how much else ran) and, with `--server-pid`, the server's CPU time
//! over the same window (utime + stime from `/proc/PID/stat`, all threads). Any connection
//! error or byte mismatch is counted (`errors`, `first_error`) and that connection dropped.
//! `--tls CA.pem` speaks TLS (rustls, ring provider) to a server whose certificate for
//! `localhost` is signed by (or is) CA.pem; the handshakes happen during the warm-up.
//!
//! `echo-server` is the ceiling: the same echo without Python, single-threaded on epoll. It
//! prints `LISTENING <addr>` (with the real port) once it accepts connections, then serves
//! until it is killed; with `--tls-cert`/`--tls-key` it is the same echo over TLS (rustls).
//! `http-server` is the HTTP ceiling, on the same loop: it finds each request head's end
//! (`\r\n\r\n`; no bodies) and answers every request, in order, with the same fixed
//! `200 OK` as the Python HTTP server, keeping the connection open. Both read into one buffer
//! shared by all connections, so an idle connection costs no buffer.
//!
//! `idle` (the memory workloads) opens N connections one after another, each with one
//! `--ping`-byte echo round trip (default 16, checked; 0: none), prints one JSON line once all
//! are open, and holds them until its stdin is closed or a signal ends it. The servers and
//! `idle` raise their soft RLIMIT_NOFILE to the hard limit.

use std::fmt::Write as _;
use std::io::{self, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::event::Source;
use mio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Registry, Token};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Extra pattern bytes beyond the message size: message k starts at offset (k * 97) % 256.
const PATTERN_SLACK: usize = 256;
/// Size of the client's read buffer.
const BUF_SIZE: usize = 256 * 1024;
/// Size of the servers' read buffer, one for all connections.
const SERVER_BUF_SIZE: usize = 256 * 1024;

// ---------------------------------------------------------------------------------------------
// addresses and streams
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Addr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Addr {
    fn parse(s: &str) -> Result<Addr, String> {
        if let Some(rest) = s.strip_prefix("tcp:") {
            rest.parse()
                .map(Addr::Tcp)
                .map_err(|e| format!("bad TCP address {rest:?}: {e}"))
        } else if let Some(rest) = s.strip_prefix("unix:") {
            if rest.is_empty() {
                return Err("empty Unix socket path".into());
            }
            Ok(Addr::Unix(PathBuf::from(rest)))
        } else {
            Err(format!(
                "bad address {s:?}: expected tcp:HOST:PORT or unix:/path"
            ))
        }
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<TlsStream>),
}

impl Stream {
    /// A blocking connect (loopback: the handshake completes in the kernel), then non-blocking;
    /// with `tls`, a TLS client (server name `localhost`) over it, handshaking on first use.
    fn connect(addr: &Addr, tls: Option<&Arc<rustls::ClientConfig>>) -> io::Result<Stream> {
        let plain = match addr {
            Addr::Tcp(a) => {
                let s = std::net::TcpStream::connect(a)?;
                s.set_nodelay(true)?;
                s.set_nonblocking(true)?;
                Stream::Tcp(TcpStream::from_std(s))
            }
            Addr::Unix(p) => {
                let s = std::os::unix::net::UnixStream::connect(p)?;
                s.set_nonblocking(true)?;
                Stream::Unix(UnixStream::from_std(s))
            }
        };
        match tls {
            None => Ok(plain),
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from("localhost")
                    .map_err(io::Error::other)?;
                let conn = rustls::ClientConnection::new(config.clone(), name)
                    .map_err(io::Error::other)?;
                Ok(Stream::Tls(Box::new(TlsStream {
                    sock: plain,
                    conn: conn.into(),
                })))
            }
        }
    }

    fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        let interest = Interest::READABLE | Interest::WRITABLE;
        match self {
            Stream::Tcp(s) => s.register(registry, token, interest),
            Stream::Unix(s) => s.register(registry, token, interest),
            Stream::Tls(t) => t.sock.register(registry, token),
        }
    }

    fn deregister(&mut self, registry: &Registry) {
        let _ = match self {
            Stream::Tcp(s) => s.deregister(registry),
            Stream::Unix(s) => s.deregister(registry),
            Stream::Tls(t) => {
                t.sock.deregister(registry);
                Ok(())
            }
        };
    }

    /// Plain stream sockets return everything queued, so a short read means the socket is
    /// drained (no need to read on until EAGAIN under edge-triggered epoll). Not so with TLS,
    /// whose plaintext may wait in rustls's buffers: always read a TLS stream until EAGAIN.
    fn short_read_drains(&self) -> bool {
        !matches!(self, Stream::Tls(_))
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            Stream::Tls(t) => t.write(buf),
        }
    }

    /// Sends what TLS has queued (a no-op for plain sockets); EAGAIN is not an error.
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tls(t) => t.flush_tls().map(|_| ()),
            _ => Ok(()),
        }
    }
}

/// rustls (client or server side) over a non-blocking socket.
struct TlsStream {
    sock: Stream,
    conn: rustls::Connection,
}

impl TlsStream {
    /// Writes the TLS records rustls has queued; Ok(false) if the socket filled up first.
    fn flush_tls(&mut self) -> io::Result<bool> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Plaintext: what rustls holds, else decrypted from the socket (EAGAIN when drained).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            match self.conn.read_tls(&mut self.sock) {
                Ok(0) => return Ok(0),
                Ok(_) => {
                    self.conn.process_new_packets().map_err(io::Error::other)?;
                    // The handshake (or a key update) may have records to send.
                    self.flush_tls()?;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Encrypts as much of `buf` as rustls accepts and sends it; EAGAIN if nothing fitted.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.flush_tls()? {
            return Err(ErrorKind::WouldBlock.into());
        }
        let n = self.conn.writer().write(buf)?;
        // A full socket is fine: the rest is flushed on the writable edge.
        self.flush_tls()?;
        if n == 0 && !buf.is_empty() {
            return Err(ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }
}

fn crypto() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS client configuration trusting only the certificate(s) in `ca` (PEM).
fn client_tls_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("{}: {e}", ca.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(crypto())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A TLS server configuration with the certificate chain `cert` and the key `key` (PEM).
fn server_tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(crypto())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(config))
}

// ---------------------------------------------------------------------------------------------
// command line
// ---------------------------------------------------------------------------------------------

const USAGE: &str = "usage:
  loadgen client --addr tcp:HOST:PORT|unix:/path --conns N --size BYTES --duration SECS
                 [--warmup SECS] [--server-pid PID] [--tls CA_CERT.pem]
  loadgen echo-server --addr tcp:HOST:PORT|unix:/path [--tls-cert CERT.pem --tls-key KEY.pem]
  loadgen http-server --addr tcp:HOST:PORT|unix:/path
  loadgen idle --addr tcp:HOST:PORT|unix:/path --conns N [--ping BYTES]";

struct ClientOpts {
    addr: Addr,
    conns: usize,
    size: usize,
    duration: f64,
    warmup: f64,
    server_pid: Option<u32>,
    /// TLS, trusting this certificate (server name `localhost`).
    tls_ca: Option<PathBuf>,
}

fn parse_flags(args: &[String]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let Some(name) = flag.strip_prefix("--") else {
            return Err(format!("unexpected argument {flag:?}"));
        };
        let value = it.next().ok_or_else(|| format!("--{name} needs a value"))?;
        out.push((name.to_string(), value.clone()));
    }
    Ok(out)
}

fn num<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("--{name}: bad number {value:?}"))
}

fn client_opts(args: &[String]) -> Result<ClientOpts, String> {
    let (mut addr, mut conns, mut size, mut duration) = (None, None, None, None);
    let (mut warmup, mut server_pid, mut tls_ca) = (0.0, None, None);
    for (name, value) in parse_flags(args)? {
        match name.as_str() {
            "addr" => addr = Some(Addr::parse(&value)?),
            "conns" => conns = Some(num::<usize>(&name, &value)?),
            "size" => size = Some(num::<usize>(&name, &value)?),
            "duration" => duration = Some(num::<f64>(&name, &value)?),
            "warmup" => warmup = num::<f64>(&name, &value)?,
            "server-pid" => server_pid = Some(num::<u32>(&name, &value)?),
            "tls" => tls_ca = Some(PathBuf::from(value)),
            _ => return Err(format!("unknown option --{name}")),
        }
    }
    let opts = ClientOpts {
        addr: addr.ok_or("--addr is required")?,
        conns: conns.ok_or("--conns is required")?,
        size: size.ok_or("--size is required")?,
        duration: duration.ok_or("--duration is required")?,
        warmup,
        server_pid,
        tls_ca,
    };
    if opts.conns == 0 || opts.size == 0 {
        return Err("--conns and --size must be positive".into());
    }
    if !(opts.duration > 0.0 && opts.warmup >= 0.0) {
        return Err("--duration must be positive and --warmup not negative".into());
    }
    Ok(opts)
}

// ---------------------------------------------------------------------------------------------
// measurements: CPU time and latency percentiles
// ---------------------------------------------------------------------------------------------

/// This process's CPU time (user + system), in seconds.
fn own_cpu_seconds() -> f64 {
    // SAFETY: `rusage` is plain old data, so all-zero bytes are a valid value, and
    // getrusage only writes into the struct we pass by pointer.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable `rusage`; RUSAGE_SELF is a valid `who`.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    if rc != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Another process's CPU time (utime + stime of all its threads, from /proc/PID/stat), in s.
fn process_cpu_seconds(pid: u32) -> Result<f64, String> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    // The command name (field 2) is in parentheses and may contain spaces: split after it.
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or_else(|| format!("{path}: unexpected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); utime is field 14, stime field 15.
    let ticks = |i: usize| -> Result<f64, String> {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .map(|v| v as f64)
            .ok_or_else(|| format!("{path}: no field {}", i + 3))
    };
    // SAFETY: sysconf has no preconditions; it only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Ok((ticks(11)? + ticks(12)?) / hz)
}

/// CPU time used by everything on the machine (all CPUs, `/proc/stat`: user, nice, system,
/// irq, softirq and steal), in seconds; with the server's and the client's own CPU time
/// subtracted it tells how much else ran during the window.
fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice
    let busy = [0usize, 1, 2, 5, 6, 7]
        .iter()
        .map(|&i| v.get(i).copied().unwrap_or(0))
        .sum::<u64>();
    // SAFETY: sysconf has no preconditions; it only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(busy as f64 / if hz > 0 { hz as f64 } else { 100.0 })
}

/// Nearest-rank percentile of sorted nanosecond samples, in µs.
fn percentile_us(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

// ---------------------------------------------------------------------------------------------
// the client
// ---------------------------------------------------------------------------------------------

/// xorshift64*: a small deterministic generator for the per-connection patterns.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

struct Conn {
    stream: Stream,
    pattern: Vec<u8>,
    seq: u64,
    /// Where the current message starts in `pattern`.
    offset: usize,
    sent: usize,
    received: usize,
    started: Instant,
}

impl Conn {
    fn next_message(&mut self, now: Instant) {
        self.seq += 1;
        self.offset = ((self.seq * 97) % PATTERN_SLACK as u64) as usize;
        self.sent = 0;
        self.received = 0;
        self.started = now;
    }
}

#[derive(Default)]
struct Window {
    measuring: bool,
    completed: u64,
    latencies_ns: Vec<u64>,
}

/// One step on a connection after an event (epoll is edge-triggered): writes what is left of
/// the current message until it is all sent or the socket is full; while `readable`, reads
/// until a short read (a stream socket returns everything queued, so it is then drained) or
/// EAGAIN, checking the bytes, and starts the next message as soon as one is complete. No
/// speculative read after a write: the echo's arrival raises a new readable edge.
fn drive(
    c: &mut Conn,
    size: usize,
    rbuf: &mut [u8],
    w: &mut Window,
    mut readable: bool,
) -> Result<(), String> {
    let drains = c.stream.short_read_drains();
    readable |= !drains;
    c.stream.flush().map_err(|e| format!("write: {e}"))?;
    loop {
        while c.sent < size {
            match c
                .stream
                .write(&c.pattern[c.offset + c.sent..c.offset + size])
            {
                Ok(0) => return Err("write returned 0".into()),
                Ok(n) => c.sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("write: {e}")),
            }
        }
        if !readable {
            return Ok(());
        }
        match c.stream.read(rbuf) {
            Ok(0) => {
                return Err(format!(
                    "connection closed by the server ({} of {size} bytes echoed)",
                    c.received
                ))
            }
            Ok(n) => {
                if c.received + n > c.sent {
                    return Err(format!(
                        "received {} bytes but only {} were sent",
                        c.received + n,
                        c.sent
                    ));
                }
                let start = c.offset + c.received;
                if rbuf[..n] != c.pattern[start..start + n] {
                    let bad = (0..n)
                        .find(|&i| rbuf[i] != c.pattern[start + i])
                        .unwrap_or(0);
                    return Err(format!(
                        "echo mismatch at byte {} of message {}",
                        c.received + bad,
                        c.seq
                    ));
                }
                c.received += n;
                readable = n == rbuf.len() || !drains;
                if c.received == size {
                    let now = Instant::now();
                    if w.measuring {
                        w.completed += 1;
                        w.latencies_ns
                            .push((now - c.started).as_nanos().min(u64::MAX as u128) as u64);
                    }
                    c.next_message(now);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => readable = false,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

fn client(opts: &ClientOpts) -> Result<String, String> {
    let mut poll = Poll::new().map_err(|e| format!("epoll: {e}"))?;
    let mut conns: Vec<Option<Conn>> = Vec::with_capacity(opts.conns);
    let tls = opts.tls_ca.as_deref().map(client_tls_config).transpose()?;
    let now = Instant::now();
    for i in 0..opts.conns {
        let mut stream = Stream::connect(&opts.addr, tls.as_ref())
            .map_err(|e| format!("connect {:?} (connection {i}): {e}", opts.addr))?;
        stream
            .register(poll.registry(), Token(i))
            .map_err(|e| format!("register: {e}"))?;
        conns.push(Some(Conn {
            stream,
            pattern: pattern(i as u64 + 1, opts.size + PATTERN_SLACK),
            seq: 0,
            offset: 0,
            sent: 0,
            received: 0,
            started: now,
        }));
    }

    let mut rbuf = vec![0u8; BUF_SIZE];
    let mut w = Window::default();
    let mut errors = 0u64;
    let mut first_error: Option<String> = None;
    let mut live = opts.conns;
    let t0 = Instant::now();
    let warm_end = t0 + Duration::from_secs_f64(opts.warmup);
    let mut end = warm_end + Duration::from_secs_f64(opts.duration);
    let (mut win_start, mut cpu0, mut srv0, mut busy0) = (t0, 0.0, None, None);
    let mut events = Events::with_capacity(1024);

    // Kick off the first message on every connection.
    for slot in conns.iter_mut() {
        if let Some(c) = slot {
            c.started = Instant::now();
            if let Err(e) = drive(c, opts.size, &mut rbuf, &mut w, false) {
                errors += 1;
                first_error.get_or_insert(e);
                c.stream.deregister(poll.registry());
                *slot = None;
                live -= 1;
            }
        }
    }

    while live > 0 {
        let now = Instant::now();
        if !w.measuring && now >= warm_end {
            w.measuring = true;
            w.completed = 0;
            w.latencies_ns.clear();
            w.latencies_ns.reserve(1 << 20);
            cpu0 = own_cpu_seconds();
            srv0 = opts.server_pid.map(process_cpu_seconds).transpose()?;
            busy0 = machine_busy_seconds();
            win_start = Instant::now();
            end = win_start + Duration::from_secs_f64(opts.duration);
        }
        if w.measuring && now >= end {
            break;
        }
        let deadline = if w.measuring { end } else { warm_end };
        match poll.poll(&mut events, Some(deadline.saturating_duration_since(now))) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("epoll_wait: {e}")),
        }
        for ev in events.iter() {
            let i = ev.token().0;
            let Some(c) = conns[i].as_mut() else { continue };
            let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
            if let Err(e) = drive(c, opts.size, &mut rbuf, &mut w, readable) {
                errors += 1;
                first_error.get_or_insert(format!("connection {i}: {e}"));
                c.stream.deregister(poll.registry());
                conns[i] = None;
                live -= 1;
            }
        }
    }
    let win_end = Instant::now();
    let cpu1 = own_cpu_seconds();
    let srv1 = opts.server_pid.map(process_cpu_seconds).transpose()?;
    let busy1 = machine_busy_seconds();
    if !w.measuring {
        // every connection failed during the warm-up
        cpu0 = cpu1;
        win_start = win_end;
    }

    let elapsed = (win_end - win_start).as_secs_f64();
    let mut lat = std::mem::take(&mut w.latencies_ns);
    lat.sort_unstable();
    let cpu = cpu1 - cpu0;
    let mut out = String::new();
    let _ = write!(
        out,
        "{{\"mode\":\"client\",\"conns\":{},\"size\":{},\"warmup_s\":{},\"duration_s\":{:.6},\
         \"requests\":{},\"rps\":{:.3},\"p50_us\":{:.1},\"p90_us\":{:.1},\"p99_us\":{:.1},\
         \"max_us\":{:.1},\"errors\":{},\"live_conns\":{},\"client_cpu_s\":{:.6},\
         \"client_cpu_frac\":{:.4}",
        opts.conns,
        opts.size,
        opts.warmup,
        elapsed,
        w.completed,
        if elapsed > 0.0 {
            w.completed as f64 / elapsed
        } else {
            0.0
        },
        percentile_us(&lat, 0.50),
        percentile_us(&lat, 0.90),
        percentile_us(&lat, 0.99),
        lat.last().map_or(0.0, |&v| v as f64 / 1000.0),
        errors,
        live,
        cpu,
        if elapsed > 0.0 { cpu / elapsed } else { 0.0 },
    );
    if let (Some(a), Some(b)) = (srv0, srv1) {
        let _ = write!(out, ",\"server_cpu_s\":{:.6}", b - a);
    }
    if let (Some(a), Some(b)) = (busy0, busy1) {
        let _ = write!(out, ",\"machine_busy_s\":{:.6}", b - a);
    }
    if let Some(e) = first_error {
        let _ = write!(out, ",\"first_error\":{}", json_str(&e));
    }
    out.push('}');
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// the plain-Rust servers (the ceilings): echo and HTTP
// ---------------------------------------------------------------------------------------------

/// The HTTP ceiling's answer to every request: the same bytes as `HTTP_RESPONSE` in
/// `benchmarks/servers.py`.
const HTTP_RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\
Connection: keep-alive\r\n\r\nHello, World!";
/// The most bytes an unfinished request head may take before the connection is dropped.
const HTTP_MAX_HEAD: usize = 64 * 1024;

#[derive(Clone, Copy)]
enum ServeMode {
    Echo,
    Http,
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A connection's own state. The servers read into one buffer shared by every connection, so
/// an idle connection holds no buffer (what `mem_idle_*` measures): only the bytes a full
/// socket did not take (`pending`), and for HTTP an unfinished request head (`partial`).
struct ServerConn {
    stream: Stream,
    pending: Vec<u8>,
    sent: usize,
    partial: Vec<u8>,
}

/// Writes `data`, keeping whatever a full socket does not take in `c.pending`; Ok(false) if
/// some was kept (stop reading until the writable edge).
fn write_or_keep(c: &mut ServerConn, data: &[u8]) -> io::Result<bool> {
    let mut off = 0;
    while off < data.len() {
        match c.stream.write(&data[off..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => off += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                c.pending.extend_from_slice(&data[off..]);
                c.sent = 0;
                return Ok(false);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Sends what a full socket left in `c.pending`. Ok(true) once nothing is pending (the
/// buffer is freed), Ok(false) if the socket filled up again.
fn flush_pending(c: &mut ServerConn) -> io::Result<bool> {
    c.stream.flush()?;
    while c.sent < c.pending.len() {
        match c.stream.write(&c.pending[c.sent..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => c.sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if !c.pending.is_empty() {
        c.pending = Vec::new();
        c.sent = 0;
    }
    Ok(true)
}

/// Reads into the shared `buf` (edge-triggered: until a short read or EAGAIN) and hands each
/// chunk to `answer`. Pending output goes first; while the socket is full nothing is read (the
/// rest comes after the writable edge: reading resumes then even without a new readable
/// edge, since data may have arrived meanwhile). Ok(false) when the peer has closed.
fn serve_conn(
    c: &mut ServerConn,
    buf: &mut [u8],
    mut readable: bool,
    mut answer: impl FnMut(&mut ServerConn, &[u8]) -> io::Result<bool>,
) -> io::Result<bool> {
    let drains = c.stream.short_read_drains();
    readable |= !drains;
    let had_pending = !c.pending.is_empty();
    if !flush_pending(c)? {
        return Ok(true);
    }
    readable |= had_pending;
    while readable {
        match c.stream.read(buf) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                readable = n == buf.len() || !drains;
                if !answer(c, &buf[..n])? {
                    return Ok(true);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => readable = false,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// The number of complete request heads in `data` (each ends with an empty line) and the
/// length of the unfinished tail after the last one. No bodies: the load has none.
fn count_requests(data: &[u8]) -> (usize, usize) {
    let (mut count, mut start, mut i) = (0, 0, 0);
    while i + 4 <= data.len() {
        match data[i + 3] {
            b'\n' if &data[i..i + 4] == b"\r\n\r\n" => {
                count += 1;
                i += 4;
                start = i;
            }
            b'\n' | b'\r' => i += 1,
            // no "\r\n\r\n" can contain byte i + 3: none starts before i + 4
            _ => i += 4,
        }
    }
    (count, data.len() - start)
}

/// HTTP: one `HTTP_RESPONSE` per complete request head in `data`, in order (pipelining).
fn http_answer(c: &mut ServerConn, data: &[u8], out: &mut Vec<u8>) -> io::Result<bool> {
    let requests = if c.partial.is_empty() {
        let (count, tail) = count_requests(data);
        c.partial.extend_from_slice(&data[data.len() - tail..]);
        count
    } else {
        c.partial.extend_from_slice(data);
        let (count, tail) = count_requests(&c.partial);
        let done = c.partial.len() - tail;
        c.partial.drain(..done);
        count
    };
    if c.partial.len() > HTTP_MAX_HEAD {
        return Err(io::Error::other("request head too large"));
    }
    if c.partial.is_empty() && c.partial.capacity() > 0 {
        c.partial = Vec::new();
    }
    match requests {
        0 => Ok(true),
        1 => write_or_keep(c, HTTP_RESPONSE),
        n => {
            out.clear();
            for _ in 0..n {
                out.extend_from_slice(HTTP_RESPONSE);
            }
            write_or_keep(c, out)
        }
    }
}

/// Raises this process's soft RLIMIT_NOFILE to the hard limit; an error if the hard limit is
/// below `need` file descriptors.
fn raise_nofile(need: usize) -> Result<(), String> {
    // SAFETY: `rlimit` is plain old data; getrlimit only writes into the struct we pass.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `lim` is a valid, writable `rlimit`; RLIMIT_NOFILE is a valid resource.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(format!("getrlimit: {}", io::Error::last_os_error()));
    }
    if (lim.rlim_max as u128) < need as u128 {
        return Err(format!(
            "the hard RLIMIT_NOFILE is {}, below the {need} file descriptors needed: raise it \
             (ulimit -Hn, /etc/security/limits.conf, systemd LimitNOFILE)",
            lim.rlim_max
        ));
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid `rlimit` with rlim_cur <= rlim_max.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(format!("setrlimit: {}", io::Error::last_os_error()));
        }
    }
    Ok(())
}

fn serve(
    addr: &Addr,
    tls: Option<Arc<rustls::ServerConfig>>,
    mode: ServeMode,
) -> Result<(), String> {
    const LISTENER: Token = Token(usize::MAX);
    // As many connections as the hard limit allows (mem_idle_* opens thousands).
    raise_nofile(0)?;
    let mut poll = Poll::new().map_err(|e| format!("epoll: {e}"))?;
    let (mut listener, shown) = match addr {
        Addr::Tcp(a) => {
            let l = TcpListener::bind(*a).map_err(|e| format!("bind {a}: {e}"))?;
            let local = l.local_addr().map_err(|e| e.to_string())?;
            (Listener::Tcp(l), format!("tcp:{local}"))
        }
        Addr::Unix(p) => {
            let _ = std::fs::remove_file(p);
            let l = UnixListener::bind(p).map_err(|e| format!("bind {}: {e}", p.display()))?;
            (Listener::Unix(l), format!("unix:{}", p.display()))
        }
    };
    match &mut listener {
        Listener::Tcp(l) => l.register(poll.registry(), LISTENER, Interest::READABLE),
        Listener::Unix(l) => l.register(poll.registry(), LISTENER, Interest::READABLE),
    }
    .map_err(|e| format!("register: {e}"))?;
    println!("LISTENING {shown}");
    io::stdout().flush().map_err(|e| e.to_string())?;

    let mut conns: Vec<Option<ServerConn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; SERVER_BUF_SIZE];
    let mut out: Vec<u8> = Vec::new();
    loop {
        match poll.poll(&mut events, None) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("epoll_wait: {e}")),
        }
        for ev in events.iter() {
            if ev.token() == LISTENER {
                loop {
                    let accepted = match &listener {
                        Listener::Tcp(l) => l.accept().map(|(s, _)| {
                            let _ = s.set_nodelay(true);
                            Stream::Tcp(s)
                        }),
                        Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
                    };
                    let plain = match accepted {
                        Ok(s) => s,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(e) => {
                            eprintln!("loadgen: accept: {e}");
                            break;
                        }
                    };
                    let stream = match &tls {
                        None => plain,
                        Some(config) => match rustls::ServerConnection::new(config.clone()) {
                            Ok(conn) => Stream::Tls(Box::new(TlsStream {
                                sock: plain,
                                conn: conn.into(),
                            })),
                            Err(e) => {
                                eprintln!("loadgen: TLS: {e}");
                                continue;
                            }
                        },
                    };
                    let idx = free.pop().unwrap_or_else(|| {
                        conns.push(None);
                        conns.len() - 1
                    });
                    let mut c = ServerConn {
                        stream,
                        pending: Vec::new(),
                        sent: 0,
                        partial: Vec::new(),
                    };
                    if c.stream.register(poll.registry(), Token(idx)).is_err() {
                        free.push(idx);
                        continue;
                    }
                    conns[idx] = Some(c);
                }
                continue;
            }
            let idx = ev.token().0;
            let Some(c) = conns[idx].as_mut() else {
                continue;
            };
            let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
            let open = match mode {
                ServeMode::Echo => serve_conn(c, &mut buf, readable, write_or_keep),
                ServeMode::Http => serve_conn(c, &mut buf, readable, |c, data| {
                    http_answer(c, data, &mut out)
                }),
            };
            if !matches!(open, Ok(true)) {
                c.stream.deregister(poll.registry());
                conns[idx] = None;
                free.push(idx);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// idle connections (mem_idle_*)
// ---------------------------------------------------------------------------------------------

struct IdleOpts {
    addr: Addr,
    conns: usize,
    ping: usize,
}

fn idle_opts(args: &[String]) -> Result<IdleOpts, String> {
    let (mut addr, mut conns, mut ping) = (None, None, 16);
    for (name, value) in parse_flags(args)? {
        match name.as_str() {
            "addr" => addr = Some(Addr::parse(&value)?),
            "conns" => conns = Some(num::<usize>(&name, &value)?),
            "ping" => ping = num::<usize>(&name, &value)?,
            _ => return Err(format!("unknown option --{name}")),
        }
    }
    let opts = IdleOpts {
        addr: addr.ok_or("--addr is required")?,
        conns: conns.ok_or("--conns is required")?,
        ping,
    };
    if opts.conns == 0 {
        return Err("--conns must be positive".into());
    }
    Ok(opts)
}

/// Sends `msg` and reads it back, checked (blocking, with the socket's timeouts).
fn round_trip(s: &mut (impl Read + Write), msg: &[u8]) -> io::Result<()> {
    if msg.is_empty() {
        return Ok(());
    }
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    if back != msg {
        return Err(io::Error::other("echo mismatch"));
    }
    Ok(())
}

/// Opens the connections one after another, each with a `ping`-byte echo round trip (so the
/// server has accepted it and set up its per-connection state before the next one opens: the
/// accept queue never overflows), prints one JSON line once all are open, then holds them
/// until stdin is closed (or a signal ends the process).
fn idle(opts: &IdleOpts) -> Result<(), String> {
    raise_nofile(opts.conns + 16)?;
    let timeout = Some(Duration::from_secs(10));
    let t0 = Instant::now();
    let cpu0 = own_cpu_seconds();
    let mut held = Vec::with_capacity(opts.conns);
    for i in 0..opts.conns {
        let msg = pattern(i as u64 + 1, opts.ping);
        let conn = match &opts.addr {
            Addr::Tcp(a) => std::net::TcpStream::connect(a).and_then(|mut s| {
                s.set_nodelay(true)?;
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)?;
                round_trip(&mut s, &msg)?;
                Ok(OwnedFd::from(s))
            }),
            Addr::Unix(p) => std::os::unix::net::UnixStream::connect(p).and_then(|mut s| {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)?;
                round_trip(&mut s, &msg)?;
                Ok(OwnedFd::from(s))
            }),
        };
        held.push(conn.map_err(|e| format!("connection {i} of {}: {e}", opts.conns))?);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    println!(
        "{{\"mode\":\"idle\",\"conns\":{},\"ping\":{},\"established_s\":{elapsed:.6},\
         \"client_cpu_s\":{:.6}}}",
        held.len(),
        opts.ping,
        own_cpu_seconds() - cpu0
    );
    io::stdout().flush().map_err(|e| e.to_string())?;
    let mut sink = [0u8; 256];
    loop {
        match io::stdin().read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    drop(held);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// main
// ---------------------------------------------------------------------------------------------

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, rest) = match args.split_first() {
        Some((m, rest)) => (m.as_str(), rest),
        None => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match mode {
        "client" => {
            let result = client_opts(rest).and_then(|o| client(&o));
            match result {
                Ok(line) => {
                    println!("{line}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    println!("{{\"error\":{}}}", json_str(&e));
                    ExitCode::from(1)
                }
            }
        }
        "echo-server" | "http-server" => {
            let result = parse_flags(rest).and_then(|flags| {
                let (mut addr, mut cert, mut key) = (None, None, None);
                for (name, value) in flags {
                    match name.as_str() {
                        "addr" => addr = Some(Addr::parse(&value)?),
                        "tls-cert" if mode == "echo-server" => cert = Some(PathBuf::from(value)),
                        "tls-key" if mode == "echo-server" => key = Some(PathBuf::from(value)),
                        _ => return Err(format!("unknown option --{name}")),
                    }
                }
                let tls = match (cert, key) {
                    (None, None) => None,
                    (Some(c), Some(k)) => Some(server_tls_config(&c, &k)?),
                    _ => return Err("--tls-cert and --tls-key go together".into()),
                };
                let serve_mode = if mode == "echo-server" {
                    ServeMode::Echo
                } else {
                    ServeMode::Http
                };
                serve(&addr.ok_or("--addr is required")?, tls, serve_mode)
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("loadgen {mode}: {e}");
                    ExitCode::from(1)
                }
            }
        }
        "idle" => match idle_opts(rest).and_then(|o| idle(&o)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("{{\"error\":{}}}", json_str(&e));
                ExitCode::from(1)
            }
        },
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("unknown mode {mode:?}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
