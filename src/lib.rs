//! ferroloop's native core: an asyncio event loop in Rust.
//!
//! Layout — one module per concept:
//! - `event_loop`: the loop proper (ready queue, iteration, run/stop/close), `LoopCore`;
//! - `handles`: `Handle`/`TimerHandle`, what the queues hold;
//! - `ready`: the ready queue and its per-iteration batches;
//! - `timers`: the timer heap with lazy cancellation;
//! - `reactor`: the epoll multiplexer behind `add_reader`/`add_writer`;
//! - `pytype`: native classes deriving from asyncio's Python transport classes;
//! - `stream`: TCP/Unix stream transports; `pipes`: read/write pipe transports;
//!   `iobuf` and `transport`: what they share (write buffer, flow control, syscalls; the
//!   common state and the methods that only touch it);
//! - `sock`: `sock_recv`/`sock_recv_into`/`sock_sendall` as native waiters;
//! - `udp`: UDP/Unix datagram transports; `sockaddr`: socket addresses as the `socket`
//!   module converts them;
//! - `server`: a server's set of live connections (the rest of a server is Python);
//! - `signals`: delivery of `add_signal_handler` callbacks;
//! - `dns`: the native thread pool behind `getaddrinfo`/`getnameinfo`;
//! - `clock`: `time.monotonic()`-identical time; `errors`: OSError with errno;
//! - `sync`: the lock helper;
//! - `pyhelpers`: stdlib helpers the core defers to for user-visible text.
//!
//! The Python package (`python/ferroloop`) subclasses `LoopCore` together with
//! `asyncio.AbstractEventLoop` and adds what runs once per loop or per run.

use pyo3::prelude::*;

pub mod clock;
pub mod dns;
pub mod errors;
pub mod event_loop;
pub mod handles;
pub mod iobuf;
pub mod pipes;
pub mod pyhelpers;
pub mod pytype;
pub mod reactor;
pub mod ready;
pub mod server;
pub mod signals;
pub mod sock;
pub mod sockaddr;
pub mod stream;
pub mod sync;
pub mod timers;
pub mod tls;
pub mod transport;
pub mod udp;

#[pymodule]
fn _ferroloop(m: &Bound<'_, PyModule>) -> PyResult<()> {
    handles::install(m.py())?;
    iobuf::install(m.py())?;
    m.add_class::<event_loop::LoopCore>()?;
    event_loop::install_fast_methods(m.py())?;
    m.add_class::<handles::Handle>()?;
    m.add_class::<handles::TimerHandle>()?;
    m.add_class::<sock::SockOp>()?;
    m.add_class::<tls::TlsProtocol>()?;
    m.add_class::<server::ClientSet>()?;
    m.add_function(wrap_pyfunction!(dns::resolve_in_pool, m)?)?;
    // Benchmarks refuse to measure a debug build.
    m.add(
        "BUILD_PROFILE",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    )?;
    Ok(())
}
