//! The resolver pool: `loop.getaddrinfo`/`loop.getnameinfo` off the loop thread.
//!
//! The system resolver blocks, so each lookup runs on one of a few native threads shared
//! by every loop in the process. A job carries the Python callable to run (the stdlib's
//! `socket.getaddrinfo`/`socket.getnameinfo`, so results are exactly the stdlib's), its
//! arguments, the asyncio future and the loop. The worker attaches to the interpreter,
//! makes the call (which detaches again for the C call itself) and hands the outcome to
//! the loop with `loop.call_soon_threadsafe`; on the loop thread the outcome is dropped if
//! the future is already done (cancelled), and a closed loop drops it silently.
//!
//! Invariants:
//! - at most [`MAX_THREADS`] workers; they start on demand and idle ones stay;
//! - the pool lock is never held while Python code runs or a worker is attached, and no
//!   Python object is dropped under it;
//! - at interpreter exit (`threading._register_atexit`, like `concurrent.futures`) the
//!   pool stops: queued jobs are dropped and running ones are waited for, so no worker is
//!   left to touch the interpreter while it finalizes;
//! - after `fork()` the child has no workers: the pool notices the new pid and starts
//!   afresh. The forking thread holds the pool lock across the fork, so the child never
//!   inherits it locked by a worker that does not exist there.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;

use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyCFunction, PyDict, PyTuple};

use crate::errors::os_error;

/// Upper bound on worker threads (the machines this targets have few cores, and lookups
/// mostly wait on the network rather than compute).
pub const MAX_THREADS: usize = 4;

/// One lookup: `func(*args)`, settling `fut` on `loop_`.
struct Job {
    func: Py<PyAny>,
    args: Py<PyTuple>,
    fut: Py<PyAny>,
    loop_: Py<PyAny>,
}

struct State {
    queue: VecDeque<Job>,
    /// Live workers, and how many of them wait for a job.
    threads: usize,
    idle: usize,
    /// Set at interpreter exit; workers leave and no job is accepted.
    shutdown: bool,
    /// The process the workers belong to (0 before the first start).
    pid: u32,
    workers: Vec<JoinHandle<()>>,
    /// Whether the exit hook is registered (in this process).
    hooked: bool,
}

struct Pool {
    state: Mutex<State>,
    work: Condvar,
}

static POOL: Pool = Pool {
    state: Mutex::new(State {
        queue: VecDeque::new(),
        threads: 0,
        idle: 0,
        shutdown: false,
        pid: 0,
        workers: Vec::new(),
        hooked: false,
    }),
    work: Condvar::new(),
};

fn state() -> MutexGuard<'static, State> {
    // A worker never panics while holding the lock, but don't let that become a panic here.
    POOL.state.lock().unwrap_or_else(|e| e.into_inner())
}

thread_local! {
    /// The pool lock, held by a thread while it forks (see [`hold_lock_across_fork`]).
    static HELD_FOR_FORK: RefCell<Option<MutexGuard<'static, State>>> = const { RefCell::new(None) };
}

extern "C" fn lock_before_fork() {
    let guard = state();
    HELD_FOR_FORK.with_borrow_mut(|held| *held = Some(guard));
}

extern "C" fn unlock_after_fork() {
    // In the child the guard's thread is this one, the only thread there.
    let guard = HELD_FOR_FORK.with_borrow_mut(Option::take);
    drop(guard);
}

/// Makes every `fork()` in the process wait for the pool lock and release it on both
/// sides. A worker holds it only for a few instructions, never while it waits for the
/// interpreter, so the wait is short and cannot deadlock with the forking thread; a child
/// forked while a worker held it would otherwise find it locked forever.
fn hold_lock_across_fork() {
    static REGISTERED: Once = Once::new();
    REGISTERED.call_once(|| {
        // SAFETY: the handlers are plain functions that live as long as the process; they
        // only lock and unlock the pool's mutex (no allocation, no Python).
        unsafe {
            libc::pthread_atfork(
                Some(lock_before_fork),
                Some(unlock_after_fork),
                Some(unlock_after_fork),
            );
        }
    });
}

/// Runs `func(*args)` on the resolver pool and settles `fut` with its result or exception
/// on `loop` (through `loop.call_soon_threadsafe`), unless `fut` is done by then.
///
/// Raises `TypeError` if `func` is not callable, `RuntimeError` once the interpreter is
/// shutting down, and `OSError` if no worker thread could be started.
#[pyfunction]
#[pyo3(signature = (r#loop, fut, func, args))]
pub fn resolve_in_pool(
    py: Python<'_>,
    r#loop: Bound<'_, PyAny>,
    fut: Bound<'_, PyAny>,
    func: Bound<'_, PyAny>,
    args: Bound<'_, PyTuple>,
) -> PyResult<()> {
    if !func.is_callable() {
        return Err(PyTypeError::new_err(format!(
            "a callable object was expected, got {}",
            func.repr()?
        )));
    }
    let job = Job {
        func: func.unbind(),
        args: args.unbind(),
        fut: fut.unbind(),
        loop_: r#loop.unbind(),
    };
    let pid = std::process::id();
    let (register_hook, stale) = {
        let mut st = state();
        let stale = if st.pid != pid {
            // First use, or a forked child: the workers (and jobs) were the parent's.
            st.pid = pid;
            st.threads = 0;
            st.idle = 0;
            st.shutdown = false;
            st.hooked = false;
            st.workers.clear(); // dropping a JoinHandle detaches; there is no thread here
            std::mem::take(&mut st.queue)
        } else {
            VecDeque::new()
        };
        let register = !st.hooked;
        st.hooked = true;
        (register, stale)
    };
    drop(stale); // the parent's jobs, dropped with no lock held
    if register_hook {
        hold_lock_across_fork();
        if let Err(err) = register_exit_hook(py) {
            state().hooked = false;
            return Err(err);
        }
    }
    submit(job)
}

/// Queues `job`, starting a worker when none is free and the cap allows.
fn submit(job: Job) -> PyResult<()> {
    let mut st = state();
    if st.shutdown {
        drop(st);
        drop(job);
        return Err(PyRuntimeError::new_err(
            "cannot resolve names after interpreter shutdown",
        ));
    }
    st.queue.push_back(job);
    if st.queue.len() > st.idle && st.threads < MAX_THREADS {
        match std::thread::Builder::new()
            .name("ferroloop-dns".into())
            .spawn(worker)
        {
            Ok(handle) => {
                st.threads += 1;
                st.workers.push(handle);
            }
            // With a worker alive the job still runs, just later; with none it never would.
            Err(err) if st.threads == 0 => {
                let job = st.queue.pop_back();
                drop(st);
                drop(job);
                return Err(os_error(err));
            }
            Err(_) => {}
        }
    }
    POOL.work.notify_one();
    Ok(())
}

/// A worker: takes jobs until the pool shuts down.
fn worker() {
    loop {
        let job = {
            let mut st = state();
            loop {
                if st.shutdown {
                    st.threads -= 1;
                    return;
                }
                if let Some(job) = st.queue.pop_front() {
                    break job;
                }
                st.idle += 1;
                st = POOL.work.wait(st).unwrap_or_else(|e| e.into_inner());
                st.idle -= 1;
            }
        };
        let mut slot = Some(job);
        Python::try_attach(|py| {
            if let Some(job) = slot.take() {
                run(py, job);
            }
        });
        if let Some(job) = slot {
            // The interpreter is gone or going: its objects can't be touched, so leak them.
            std::mem::forget(job);
        }
    }
}

/// Runs one job with the interpreter attached.
fn run(py: Python<'_>, job: Job) {
    let Job {
        func,
        args,
        fut,
        loop_,
    } = job;
    let fut = fut.into_bound(py);
    // Cancelled while queued: skip the lookup (the future is only read under the GIL).
    if fut
        .call_method0(intern!(py, "done"))
        .and_then(|d| d.is_truthy())
        .unwrap_or(false)
    {
        return;
    }
    let (value, is_exc) = match func.bind(py).call1(args.bind(py)) {
        Ok(result) => (result, false),
        Err(err) => (err.into_value(py).into_bound(py).into_any(), true),
    };
    let deliver = match deliver_fn(py) {
        Ok(f) => f,
        Err(err) => {
            err.write_unraisable(py, Some(&fut));
            return;
        }
    };
    let loop_ = loop_.bind(py);
    if let Err(err) = deliver.call1((loop_, &fut, value, is_exc)) {
        // A closed loop (RuntimeError) will never run the callback: drop the outcome.
        if !err.is_instance_of::<PyRuntimeError>(py) {
            err.write_unraisable(py, Some(loop_));
        }
    }
}

/// Python source of the delivery helpers. `deliver` runs on the resolver thread: as a
/// Python function it gives `call_soon_threadsafe` a caller frame, which debug-mode loops
/// (the stdlib's and ours) record as the handle's source and fail without. `_settle` runs
/// on the loop thread, asyncio's `_set_result_unless_cancelled` extended to exceptions.
const DELIVER_SRC: &std::ffi::CStr = c"
def _settle(fut, value, is_exc):
    if fut.done():
        return
    if is_exc:
        fut.set_exception(value)
    else:
        fut.set_result(value)


def deliver(loop, fut, value, is_exc):
    loop.call_soon_threadsafe(_settle, fut, value, is_exc)
";

/// The `deliver(loop, fut, value, is_exc)` helper, compiled once.
fn deliver_fn(py: Python<'_>) -> PyResult<&Bound<'_, PyAny>> {
    static F: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    F.get_or_try_init(py, || {
        let globals = PyDict::new(py);
        py.run(DELIVER_SRC, Some(&globals), None)?;
        Ok::<_, PyErr>(globals.as_any().get_item("deliver")?.unbind())
    })
    .map(|f| f.bind(py))
}

/// Registers [`shut_down`] to run at interpreter exit, before finalization starts.
fn register_exit_hook(py: Python<'_>) -> PyResult<()> {
    let hook = PyCFunction::new_closure(
        py,
        Some(c"_ferroloop_dns_shutdown"),
        None,
        |args: &Bound<'_, PyTuple>, _kwargs| shut_down(args.py()),
    )?;
    py.import(intern!(py, "threading"))?
        .call_method1(intern!(py, "_register_atexit"), (hook,))?;
    Ok(())
}

/// Stops the pool: drops queued jobs and waits for running ones to finish.
fn shut_down(py: Python<'_>) {
    let (queued, workers) = {
        let mut st = state();
        st.shutdown = true;
        (
            std::mem::take(&mut st.queue),
            std::mem::take(&mut st.workers),
        )
    };
    POOL.work.notify_all();
    drop(queued); // attached: these hold Python objects
                  // Detached: a running job needs the interpreter to finish.
    py.detach(|| {
        for w in workers {
            // A worker that panicked has nothing left to wait for.
            let _ = w.join();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_child_forked_while_a_worker_holds_the_pool_lock_can_take_it() {
        hold_lock_across_fork();
        let (locked_tx, locked_rx) = std::sync::mpsc::channel();
        let holder = std::thread::spawn(move || {
            let guard = state();
            locked_tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            drop(guard);
        });
        locked_rx.recv().unwrap();
        // SAFETY: the child only polls the pool's mutex, then exits without unwinding.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let deadline = Instant::now() + Duration::from_secs(2);
            let code = loop {
                if POOL.state.try_lock().is_ok() {
                    break 0;
                }
                if Instant::now() > deadline {
                    break 1;
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            // SAFETY: ends the child at once, with no atexit handlers or unwinding.
            unsafe { libc::_exit(code) };
        }
        holder.join().unwrap();
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "the child found the pool lock held"
        );
    }
}
