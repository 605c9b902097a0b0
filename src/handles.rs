//! `Handle` and `TimerHandle`: what `call_soon`, `call_later`, `call_at` and
//! `add_reader`/`add_writer` return, and what the ready queue holds.
//!
//! Both are frozen Rust classes so the loop reads them without borrow bookkeeping: the
//! only mutable state is the cancelled flag (atomic) and the callback slot, which
//! `cancel()` empties to drop references early, as the stdlib does.
//!
//! A handle is on the path of every callback, so it is kept cheap:
//! - the positional arguments are stored as they came, with no tuple for the common
//!   zero- and one-argument cases ([`Args`]), and the callback is called by vectorcall;
//! - a context captured implicitly (`context=None`) is not kept at all when it is
//!   empty (the callback runs in a new empty context, [`ContextSlot`]), and otherwise
//!   kept out of the cyclic garbage collector until it is exposed, like the handle
//!   itself (see [`Handle::context`]);
//! - what only debug mode needs lives behind one pointer ([`DebugState`]);
//! - a running loop reuses the one-shot handles nobody else kept ([`HandlePool`]),
//!   instead of freeing one object and allocating the next for every callback.

use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use pyo3::exceptions::{PyKeyboardInterrupt, PySystemExit};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use pyo3::{ffi, intern};

use crate::pyhelpers;
use crate::sync::{lock, SpinLock};
use crate::timers::Timer;

/// A callback's positional arguments, without a tuple when there are fewer than two.
pub(crate) enum Args {
    /// `callback()`.
    Zero,
    /// `callback(arg)`.
    One(Py<PyAny>),
    /// `callback(*args)`, two or more.
    Many(Py<PyTuple>),
}

impl Args {
    /// The arguments of a tuple, unpacked when it holds fewer than two.
    pub(crate) fn from_tuple(args: Bound<'_, PyTuple>) -> Self {
        match args.len() {
            0 => Args::Zero,
            // SAFETY: index 0 exists in a tuple of length 1.
            1 => Args::One(unsafe { args.get_item_unchecked(0) }.unbind()),
            _ => Args::Many(args.unbind()),
        }
    }

    /// The arguments in a vectorcall argument array.
    ///
    /// # Safety
    /// Every pointer in `args` is a live object.
    #[inline]
    pub(crate) unsafe fn from_slice(py: Python<'_>, args: &[*mut ffi::PyObject]) -> PyResult<Self> {
        // SAFETY: live objects (upheld by the caller); each Bound takes a reference.
        let get = |p: *mut ffi::PyObject| unsafe { Bound::from_borrowed_ptr(py, p) };
        Ok(match args {
            [] => Args::Zero,
            [one] => Args::One(get(*one).unbind()),
            many => Args::Many(PyTuple::new(py, many.iter().map(|p| get(*p)))?.unbind()),
        })
    }

    /// The arguments as a tuple (`Handle._args`, callback formatting).
    pub(crate) fn to_tuple<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        match self {
            Args::Zero => Ok(PyTuple::empty(py)),
            Args::One(a) => PyTuple::new(py, [a.bind(py)]),
            Args::Many(t) => Ok(t.bind(py).clone()),
        }
    }

    fn clone_ref(&self, py: Python<'_>) -> Self {
        match self {
            Args::Zero => Args::Zero,
            Args::One(a) => Args::One(a.clone_ref(py)),
            Args::Many(t) => Args::Many(t.clone_ref(py)),
        }
    }

    /// Drops the references with the interpreter attached (no deferred-release check).
    fn release(self, py: Python<'_>) {
        match self {
            Args::Zero => {}
            Args::One(a) => drop(a.into_bound(py)),
            Args::Many(t) => drop(t.into_bound(py)),
        }
    }

    /// `func(*args)`, discarding the result; false if it raised (the exception is left
    /// set, see [`run_in_context`]).
    #[inline]
    fn call(&self, func: &Bound<'_, PyAny>) -> bool {
        let f = func.as_ptr();
        // SAFETY: `f` and the arguments are live objects we hold references to; each
        // call returns a new reference or NULL with an exception set.
        let ret = unsafe {
            match self {
                Args::Zero => ffi::PyObject_CallNoArgs(f),
                Args::One(a) => ffi::PyObject_CallOneArg(f, a.as_ptr()),
                Args::Many(t) => ffi::PyObject_Call(f, t.as_ptr(), std::ptr::null_mut()),
            }
        };
        if ret.is_null() {
            return false;
        }
        // SAFETY: `ret` is a new reference (None, usually), released at once.
        unsafe { ffi::Py_DECREF(ret) };
        true
    }
}

/// The callable and its positional arguments.
pub(crate) struct Callback {
    pub func: Py<PyAny>,
    pub args: Args,
}

impl Callback {
    fn clone_ref(&self, py: Python<'_>) -> Self {
        Callback {
            func: self.func.clone_ref(py),
            args: self.args.clone_ref(py),
        }
    }

    /// Drops the references with the interpreter attached (no deferred-release check).
    fn release(self, py: Python<'_>) {
        drop(self.func.into_bound(py));
        self.args.release(py);
    }
}

/// What a handle keeps in debug mode only.
struct DebugState {
    /// The repr taken at cancel time, when the callback is dropped.
    repr_at_cancel: Mutex<Option<String>>,
    source_traceback: Option<Py<PyAny>>,
}

/// A callback scheduled on the loop (`asyncio.Handle`'s interface).
#[pyclass(frozen, subclass, module = "ferroloop", name = "Handle")]
pub struct Handle {
    /// Taken (not just read) only in short sections that run no Python code; what is
    /// taken out is released after the lock is given back.
    callback: SpinLock<Option<Callback>>,
    /// The context to run in (see [`ContextSlot`]).
    context: ContextSlot,
    /// The context was captured implicitly and is untracked by the cyclic GC until
    /// someone else can see it (see [`Handle::context`]).
    context_hidden: AtomicBool,
    /// Released in `Drop`.
    loop_: ManuallyDrop<Py<PyAny>>,
    cancelled: AtomicBool,
    debug: bool,
    /// Runs at most once (`call_soon`/`call_later`), unlike reader, writer and signal
    /// handles; such a handle drops its callback when it runs (see [`install`]).
    oneshot: bool,
    debug_state: Option<Box<DebugState>>,
    /// The handle is a [`TimerHandle`].
    timer: bool,
    /// Unused: makes a handle object 96 bytes (see [`HANDLE_SIZE`]).
    _padding: [usize; 2],
}

/// The size of `Handle`'s fields: a handle object is these plus the 16-byte object
/// header, 96 bytes on 64-bit platforms.
///
/// Not 80, which the fields alone would make: CPython's small-object allocator keeps
/// each 16-byte size class in its own pools, and the 80-byte class is also that of weak
/// references (asyncio registers every task through one) and of small tuples and
/// builtin methods, all collector objects. Handles, queued by the thousand, interleaved
/// with those spread them over twice the memory, and every collection walks them: in a
/// tree of 56,000 tasks the collector took 20% longer. Almost no collector object is 96
/// bytes.
const HANDLE_SIZE: usize = 10 * std::mem::size_of::<usize>();
#[cfg(target_pointer_width = "64")]
const _: () = assert!(std::mem::size_of::<Handle>() == HANDLE_SIZE);

/// A callback scheduled for a deadline (`asyncio.TimerHandle`'s interface).
///
/// The timer state lives here rather than in `Handle`, so plain handles (the
/// per-callback object) stay smaller. Not a collector type either (see [`install`]).
#[pyclass(frozen, subclass, extends = Handle, module = "ferroloop", name = "TimerHandle")]
pub struct TimerHandle {
    when: f64,
    /// `call_at` was given an int, which `when()` gives back as an int (the stdlib
    /// keeps the object it was given; aiohttp checks for its `ceil()`ed int).
    int: bool,
    /// In the loop's timer heap.
    scheduled: AtomicBool,
    /// The heap's count of cancelled entries, bumped if cancelled while scheduled.
    cancel_count: Arc<AtomicUsize>,
}

impl TimerHandle {
    /// The `Handle` part of a timer handle.
    pub(crate) fn base(h: &Py<TimerHandle>) -> &Py<Handle> {
        // SAFETY: `Py<T>` is a transparent object pointer whatever `T`, and a
        // `TimerHandle` is a `Handle` (its base class, laid out first).
        unsafe { &*std::ptr::from_ref(h).cast::<Py<Handle>>() }
    }
}

/// Everything needed to build a handle.
pub(crate) struct NewHandle<'py> {
    pub func: Bound<'py, PyAny>,
    pub args: Args,
    pub context: Option<Bound<'py, PyAny>>,
    pub loop_: &'py Bound<'py, PyAny>,
    pub debug: bool,
}

impl NewHandle<'_> {
    /// The context to run in: the one given, or a copy of the current one (kept out of
    /// the collector outside debug mode, hence the returned "hidden" flag).
    ///
    /// With `lazy` (a handle that runs at most once) an empty current context is not
    /// kept at all (`None`): the callback runs in a new empty context made when it runs
    /// (or when someone asks for it, see [`ContextSlot`]), which is all a copy of an
    /// empty context can be. Queued callbacks then cost no context object each, which
    /// is much of their memory when a million are queued.
    fn capture_context(
        py: Python<'_>,
        context: Option<Bound<'_, PyAny>>,
        debug: bool,
        lazy: bool,
    ) -> PyResult<(Option<Py<PyAny>>, bool)> {
        if let Some(c) = context {
            return Ok((Some(c.unbind()), false));
        }
        // SAFETY: called with the interpreter attached; the result is a new reference or
        // NULL with an exception set.
        let ctx = unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyContext_CopyCurrent())? };
        // SAFETY: `ctx` is a live context; its length is its number of variables.
        if lazy && !debug && unsafe { ffi::PyMapping_Size(ctx.as_ptr()) } == 0 {
            // Released at once: the context free list gives it to the next copy.
            return Ok((None, false));
        }
        // A fresh copy is referenced by this handle alone, so it cannot be part of a
        // cycle until it is handed out or the handle lets it go: keep it out of the
        // collector's lists meanwhile (a million queued callbacks would otherwise be a
        // million tracked contexts for every collection to walk). In debug mode,
        // everything stays tracked.
        if !debug {
            // SAFETY: `ctx` is a live, tracked context (PyContext_CopyCurrent tracks what
            // it returns); it is tracked again before anyone else sees it and before it
            // is released (`Handle::context`, `Handle::take_context`,
            // `HandlePool::recycle`).
            unsafe { ffi::PyObject_GC_UnTrack(ctx.as_ptr().cast()) };
        }
        Ok((Some(ctx.unbind()), !debug))
    }

    fn build(self, timer: bool, oneshot: bool) -> PyResult<Handle> {
        let py = self.func.py();
        let (context, context_hidden) =
            Self::capture_context(py, self.context, self.debug, oneshot)?;
        let debug_state = if self.debug {
            Some(Box::new(DebugState {
                repr_at_cancel: Mutex::new(None),
                source_traceback: pyhelpers::extract_caller_stack(py)?,
            }))
        } else {
            None
        };
        Ok(Handle {
            callback: SpinLock::new(Some(Callback {
                func: self.func.unbind(),
                args: self.args,
            })),
            context: ContextSlot::new(context),
            context_hidden: AtomicBool::new(context_hidden),
            loop_: ManuallyDrop::new(self.loop_.clone().unbind()),
            cancelled: AtomicBool::new(false),
            debug: self.debug,
            oneshot,
            debug_state,
            timer,
            _padding: [0; 2],
        })
    }

    /// A plain handle; `oneshot` for `call_soon`, not for I/O or signal callbacks.
    pub fn handle(self, oneshot: bool) -> PyResult<Py<Handle>> {
        let py = self.func.py();
        let debug = self.debug;
        let handle = self.build(false, oneshot)?;
        if debug {
            let init = PyClassInitializer::from(handle).add_subclass(TrackedHandle);
            Ok(Bound::new(py, init)?.into_super().unbind())
        } else {
            Py::new(py, handle)
        }
    }

    /// A one-shot handle, reusing one from `pool` when it has one.
    pub fn oneshot(self, pool: &HandlePool) -> PyResult<Py<Handle>> {
        if self.debug {
            return self.handle(true);
        }
        let Some(h) = pool.take() else {
            return self.handle(true);
        };
        let py = self.func.py();
        let this = h.get();
        debug_assert!(this.loop_.is(self.loop_) && this.oneshot && !this.timer);
        let (context, hidden) = Self::capture_context(py, self.context, false, true)?;
        // SAFETY: `h` came out of the pool, which held the only reference to it (see
        // `HandlePool`), and that reference is now ours: nothing else can read the slot.
        let old = unsafe { this.context.replace(context) };
        debug_assert!(old.is_none());
        this.context_hidden.store(hidden, Ordering::Relaxed);
        this.cancelled.store(false, Ordering::Relaxed);
        let cb = Callback {
            func: self.func.unbind(),
            args: self.args,
        };
        // SAFETY: as above, no one else can reach the handle, so no one holds or takes
        // its lock.
        let old = unsafe { this.callback.with_unlocked(|slot| slot.replace(cb)) };
        debug_assert!(old.is_none());
        Ok(h)
    }

    /// A timer handle due at `when`, counted in `cancel_count` if cancelled while scheduled.
    pub fn timer(
        self,
        when: f64,
        int: bool,
        cancel_count: Arc<AtomicUsize>,
    ) -> PyResult<Py<TimerHandle>> {
        let py = self.func.py();
        let debug = self.debug;
        let init = PyClassInitializer::from(self.build(true, true)?).add_subclass(TimerHandle {
            when,
            int,
            scheduled: AtomicBool::new(true),
            cancel_count,
        });
        if debug {
            let init = init.add_subclass(TrackedTimerHandle);
            Ok(Bound::new(py, init)?.into_super().unbind())
        } else {
            Py::new(py, init)
        }
    }
}

/// Debug mode's plain handles: a `Handle` the cyclic garbage collector tracks, as the
/// stdlib's handles are (debug-mode handles keep their callback after running).
#[pyclass(frozen, extends = Handle, module = "ferroloop", name = "Handle")]
pub struct TrackedHandle;

/// Debug mode's timer handles: a `TimerHandle` the collector tracks (see
/// [`TrackedHandle`]).
#[pyclass(frozen, extends = TimerHandle, module = "ferroloop", name = "TimerHandle")]
pub struct TrackedTimerHandle;

/// Makes `Handle` and `TimerHandle` types whose instances are not garbage-collector
/// objects; called once, when the module is initialised, before any handle exists.
///
/// Handles are short-lived and numerous (one per task step); tracked by the cyclic
/// garbage collector, a queue of a million of them would make every collection walk
/// them all, which cost more than scheduling itself. The collector cannot see an
/// untracked object's references, so a cycle through one would never be freed; handles
/// therefore hold their callback only while the loop holds them: a one-shot handle
/// drops it once run, a cancelled one at once, and `close()` drops every queued or
/// registered handle. In debug mode handles are tracked and keep their callback, as the
/// stdlib's do, for the reports.
///
/// PyO3 gives every class `Py_TPFLAGS_HAVE_GC`, so every handle would carry a collector
/// header and count as a collector allocation, bringing collections forward: with
/// 100,000 tasks scheduled at once (one handle each), 12% more young collections and one
/// more full collection walking every live task, which dominate such a workload. A
/// handle outside debug mode never needs the collector, and debug mode makes
/// [`TrackedHandle`]s and [`TrackedTimerHandle`]s. So each type loses the
/// flag and its traverse/clear slots, frees with `PyObject_Free`, and deallocates
/// without the GC untracking PyO3's deallocator would do ([`handle_dealloc`],
/// [`timer_handle_dealloc`]). The tracked subclasses stay GC types (CPython allows a GC
/// subtype of a non-GC base; their own slots are untouched).
///
/// This and the two deallocators are the only places that rely on PyO3 internals (its
/// object layout's `tp_dealloc`).
pub fn install(py: Python<'_>) -> PyResult<()> {
    // SAFETY: each type is PyO3's heap type object, just created (the module is being
    // initialised and no instance exists yet); the deallocators match the types.
    unsafe {
        make_plain(py.get_type::<Handle>().as_type_ptr(), handle_dealloc);
        // Created after `Handle` changed, so it inherits a consistent base.
        make_plain(
            py.get_type::<TimerHandle>().as_type_ptr(),
            timer_handle_dealloc,
        );
    }
    // The tracked subclasses are created after the change, for the same reason.
    let _ = py.get_type::<TrackedHandle>();
    let _ = py.get_type::<TrackedTimerHandle>();
    Ok(())
}

/// Turns `tp` into a non-GC type deallocated by `dealloc` (see [`install`]).
///
/// # Safety
/// `tp` is a heap type with no instance yet, whose instances `dealloc` can deallocate.
unsafe fn make_plain(tp: *mut ffi::PyTypeObject, dealloc: ffi::destructor) {
    // SAFETY: plain slot writes to a heap type (upheld by the caller), announced to
    // CPython's caches by PyType_Modified.
    unsafe {
        (*tp).tp_flags &= !ffi::Py_TPFLAGS_HAVE_GC;
        (*tp).tp_traverse = None;
        (*tp).tp_clear = None;
        (*tp).tp_free = Some(ffi::PyObject_Free);
        (*tp).tp_dealloc = Some(dealloc);
        ffi::PyType_Modified(tp);
    }
}

/// `tp_dealloc` of `Handle` (see [`install`]): PyO3's deallocation minus the GC untrack.
///
/// # Safety
/// Called by CPython, with the thread attached, for a `Handle` whose refcount fell to 0.
unsafe extern "C" fn handle_dealloc(obj: *mut ffi::PyObject) {
    // SAFETY: forwarded from CPython.
    unsafe { plain_dealloc::<Handle>(obj) }
}

/// `tp_dealloc` of `TimerHandle` (see [`install`]): as [`handle_dealloc`].
///
/// # Safety
/// Called by CPython, with the thread attached, for a `TimerHandle` whose refcount fell
/// to 0.
unsafe extern "C" fn timer_handle_dealloc(obj: *mut ffi::PyObject) {
    // SAFETY: forwarded from CPython.
    unsafe { plain_dealloc::<TimerHandle>(obj) }
}

/// PyO3's deallocation of a `T` (its value and its bases', then the memory with the
/// type's `tp_free`, then the heap type reference) without PyO3's GC untrack.
///
/// # Safety
/// Called with the thread attached, for a `T` (or a subclass instance, whose own
/// deallocator ran first) whose refcount fell to 0.
unsafe fn plain_dealloc<T: pyo3::impl_::pyclass::PyClassImpl>(obj: *mut ffi::PyObject) {
    use pyo3::impl_::pycell::PyClassObjectBaseLayout;
    // SAFETY: CPython runs deallocators with the thread attached.
    let py = unsafe { Python::assume_attached() };
    // The handles' `Drop`s release every Python reference they hold directly (no
    // deferred release), and panic nowhere; an unexpected panic must not unwind into
    // CPython.
    let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // SAFETY: `obj` is a `T` being deallocated (upheld by the caller).
        unsafe { <T::Layout as PyClassObjectBaseLayout<T>>::tp_dealloc(py, obj) }
    }));
    if done.is_err() {
        std::process::abort();
    }
}

/// The context a handle runs in: an owned reference, or null for an implicitly captured
/// empty context that was not needed yet (see [`NewHandle::capture_context`]).
///
/// Made on first use ([`ContextSlot::materialize`], a compare-and-swap, so concurrent
/// callers agree on one); replaced only through [`ContextSlot::replace`], whose caller
/// must hold the only reference to the handle (the [`HandlePool`] protocol), so a
/// replacement never meets a reader.
struct ContextSlot(AtomicPtr<ffi::PyObject>);

impl ContextSlot {
    fn new(context: Option<Py<PyAny>>) -> Self {
        Self(AtomicPtr::new(
            context.map_or(std::ptr::null_mut(), Py::into_ptr),
        ))
    }

    /// The context, if it exists.
    fn get<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
        let ptr = self.0.load(Ordering::Acquire);
        // SAFETY: a non-null pointer is a reference the slot owns; it stays valid while
        // the handle lives (it is only replaced with no other reference to the handle).
        (!ptr.is_null()).then(|| unsafe { Bound::from_borrowed_ptr(py, ptr) })
    }

    /// The context, made (empty) first if it does not exist yet.
    fn materialize<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        if let Some(context) = self.get(py) {
            return Ok(context);
        }
        // SAFETY: the result is a new reference or NULL with an exception set.
        let new = unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyContext_New())? };
        let ptr = new.as_ptr();
        match self.0.compare_exchange(
            std::ptr::null_mut(),
            ptr,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => {
                // The slot keeps a reference of its own; `new` goes to the caller.
                std::mem::forget(new.clone());
                Ok(new)
            }
            // Another thread made it first: use that one.
            // SAFETY: as in `get`.
            Err(existing) => Ok(unsafe { Bound::from_borrowed_ptr(py, existing) }),
        }
    }

    /// Keeps `context` as the handle's context if it has none yet: a one-shot callback
    /// ran in a context nobody could see, and now the exception handler may ask for it.
    fn adopt(&self, context: &Bound<'_, PyAny>) {
        let ptr = context.as_ptr();
        if self
            .0
            .compare_exchange(
                std::ptr::null_mut(),
                ptr,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            // The slot now owns a reference of its own.
            std::mem::forget(context.clone());
        }
    }

    /// Takes the context out (the handle is going away).
    fn take(&mut self) -> Option<Py<PyAny>> {
        let ptr = std::mem::replace(self.0.get_mut(), std::ptr::null_mut());
        // SAFETY: a non-null pointer is a reference the slot owned, now the caller's;
        // only `Drop` calls this, with the interpreter attached.
        (!ptr.is_null())
            .then(|| unsafe { Bound::from_owned_ptr(Python::assume_attached(), ptr).unbind() })
    }

    /// Replaces the context, returning the old one.
    ///
    /// # Safety
    /// The caller holds the only reference to the handle (its refcount is the one it
    /// owns, and the handle is no collector object, so nothing can find it), so no
    /// reference borrowed from the slot is alive.
    unsafe fn replace(&self, context: Option<Py<PyAny>>) -> Option<Py<PyAny>> {
        let new = context.map_or(std::ptr::null_mut(), Py::into_ptr);
        // No one else can access the slot, so a plain load and store do (no costlier
        // read-modify-write; the pool's lock publishes the store to the next user).
        let old = self.0.load(Ordering::Relaxed);
        if old != new {
            self.0.store(new, Ordering::Relaxed);
        }
        // SAFETY: a non-null pointer is a reference the slot owned, now the caller's;
        // the caller holds a handle reference, so the interpreter is attached.
        (!old.is_null())
            .then(|| unsafe { Bound::from_owned_ptr(Python::assume_attached(), old).unbind() })
    }
}

/// An empty `contextvars.Context` a running loop reuses for the callbacks that need a
/// fresh empty one (scheduled with an empty current context, and held by nobody but the
/// ready queue: see [`Handle::run_in_fresh_context`]), instead of making one per
/// callback.
///
/// Indistinguishable from a new context to the callbacks: one is handed out only while
/// it is empty and referenced by the loop alone, and taken out while a callback runs in
/// it. A callback that sets a context variable leaves it non-empty, and it is dropped
/// instead of reused; so is one someone kept a reference to (a context-switch watcher
/// could). It belongs to the running `run_forever` (a local of its loop, like the batch
/// buffer), so a nested iteration has its own, and no atomic operation is needed.
#[derive(Default)]
pub(crate) struct ScratchContext(Option<Py<PyAny>>);

impl ScratchContext {
    /// The scratch context (now the caller's), or a new empty one if there is none.
    /// None if making one failed, with the exception set (see [`run_in_context`]).
    #[inline]
    fn take<'py>(&mut self, py: Python<'py>) -> Option<Bound<'py, PyAny>> {
        match self.0.take() {
            Some(context) => Some(context.into_bound(py)),
            // SAFETY: a new reference or NULL with an exception set.
            None => unsafe { Bound::from_owned_ptr_or_opt(py, ffi::PyContext_New()) },
        }
    }

    /// Keeps `context` for the next callback if it is as good as new: still empty, and
    /// referenced by the caller alone (otherwise it is released).
    #[inline]
    fn give_back(&mut self, context: Bound<'_, PyAny>) {
        let ptr = context.as_ptr();
        // SAFETY: `context` is a live contextvars.Context, whose length (its number of
        // variables) cannot fail to compute.
        let pristine = unsafe { ffi::Py_REFCNT(ptr) == 1 && ffi::PyMapping_Size(ptr) == 0 };
        if pristine && self.0.is_none() {
            self.0 = Some(context.unbind());
        }
    }

    /// Releases the scratch context, if any (its `run_forever` is done).
    pub(crate) fn release(self, py: Python<'_>) {
        if let Some(context) = self.0 {
            drop(context.into_bound(py));
        }
    }
}

/// How many spent handles a running loop keeps for reuse.
const POOL_MAX: usize = 256;

/// Spent one-shot handles a running loop keeps to reuse for its next callbacks.
///
/// A handle enters the pool after it ran, if the ready queue's reference was the only
/// one (the caller of `call_soon` dropped its handle, as the C `Task` does): nothing
/// can reach it then (a plain handle is not a collector object, so not even
/// `gc.get_referrers` finds it), so its fields can be rewritten in place. Pooled handles hold no callback and no context,
/// only their loop; the loop empties its pool when it stops running and when it
/// closes, so the pool never keeps a stopped loop alive.
#[derive(Default)]
pub(crate) struct HandlePool {
    free: SpinLock<Vec<Py<Handle>>>,
}

impl HandlePool {
    fn take(&self) -> Option<Py<Handle>> {
        self.free.lock().pop()
    }

    /// Keeps `h`, a handle the loop just ran and let go of, if it can be reused;
    /// otherwise releases it.
    pub(crate) fn recycle(&self, h: Bound<'_, Handle>) {
        let this = h.get();
        // SAFETY: `h` is a live object.
        let sole = unsafe { ffi::Py_REFCNT(h.as_ptr()) } == 1;
        if !sole || !this.oneshot || this.debug || this.timer {
            return;
        }
        // A one-shot handle outside debug mode gave its callback up when it ran (see
        // `Handle::run`).
        debug_assert!(this.callback.lock().is_none());
        // SAFETY: ours is the only reference and the handle is no collector object (not
        // debug): nothing else can reach it.
        let context = unsafe { this.context.replace(None) };
        if let Some(context) = context {
            if this.context_hidden.load(Ordering::Relaxed) {
                this.context_hidden.store(false, Ordering::Relaxed);
                // SAFETY: the context is live and untracked (hidden); see
                // `Handle::take_context` for why it must be tracked when released.
                unsafe { ffi::PyObject_GC_Track(context.as_ptr().cast()) };
            }
            drop(context.into_bound(h.py()));
        }
        let h = {
            let mut free = self.free.lock();
            if free.len() < POOL_MAX {
                free.push(h.unbind());
                return;
            }
            h
        };
        // Released with the lock given back.
        drop(h);
    }

    /// Empties the pool; the handles are returned to be released with no lock held.
    pub(crate) fn drain(&self) -> Vec<Py<Handle>> {
        std::mem::take(&mut *self.free.lock())
    }
}

fn is_fatal(py: Python<'_>, err: &PyErr) -> bool {
    err.is_instance_of::<PySystemExit>(py) || err.is_instance_of::<PyKeyboardInterrupt>(py)
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: a handle is only dropped with the interpreter attached: it is a Python
        // object (dropped by its deallocator) or a value inside a function that holds
        // the interpreter.
        let py = unsafe { Python::assume_attached() };
        if let Some(context) = self.take_context() {
            drop(context.into_bound(py));
        }
        // SAFETY: taken exactly once, here, and never used again.
        let loop_ = unsafe { ManuallyDrop::take(&mut self.loop_) };
        drop(loop_.into_bound(py));
        if let Some(cb) = self.callback.get_mut().take() {
            cb.release(py);
        }
        // Every Python reference is released as a `Bound` (a plain decref), so dropping
        // a handle never depends on PyO3's attach bookkeeping (see `handle_dealloc`).
        if let Some(tb) = self.debug_state.take().and_then(|d| d.source_traceback) {
            drop(tb.into_bound(py));
        }
    }
}

impl Handle {
    /// True once cancelled.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Drops the callback of a handle that can no longer run (its loop closed, its
    /// registration replaced), breaking any cycle through it; see [`install`].
    pub(crate) fn release(&self) {
        let cb = self.take_callback();
        drop(cb);
    }

    /// Empties the callback slot; the caller drops what it gets with the lock released.
    fn take_callback(&self) -> Option<Callback> {
        self.callback.lock().take()
    }

    /// `cancel()` from Rust.
    pub(crate) fn cancel_now(slf: &Bound<'_, Self>) -> PyResult<()> {
        slf.get().do_cancel(slf)
    }

    /// The handle's context, made visible to the collector first if it was hidden:
    /// once someone else holds it, it can take part in a cycle.
    fn context(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let context = self.context.materialize(py)?;
        if self.context_hidden.swap(false, Ordering::Relaxed) {
            // SAFETY: the context is live and was untracked while hidden; the flag is
            // cleared first, so it is tracked exactly once.
            unsafe { ffi::PyObject_GC_Track(context.as_ptr().cast()) };
        }
        Ok(context.unbind())
    }

    /// Takes the context out, tracked again if it was hidden: CPython's context
    /// deallocator unlinks a context from the collector's lists unconditionally, so it
    /// must be in them when its last reference goes.
    fn take_context(&mut self) -> Option<Py<PyAny>> {
        let context = self.context.take()?;
        if std::mem::take(self.context_hidden.get_mut()) {
            // SAFETY: only `Drop` calls this, with the interpreter attached; the context
            // is live and untracked (hidden).
            unsafe { ffi::PyObject_GC_Track(context.as_ptr().cast()) };
        }
        Some(context)
    }

    fn do_cancel(&self, slf: &Bound<'_, Self>) -> PyResult<()> {
        if self.cancelled.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        if self.timer {
            // SAFETY: only timer handles have `timer` set.
            let t = unsafe { slf.cast_unchecked::<TimerHandle>() }.get();
            if t.scheduled.load(Ordering::Relaxed) {
                t.cancel_count.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(d) = &self.debug_state {
            let r = Self::repr_text(slf, false)?;
            *lock(&d.repr_at_cancel) = Some(r);
        }
        let dropped = self.take_callback();
        drop(dropped);
        Ok(())
    }

    /// Runs the callback inside its context. A `SystemExit`/`KeyboardInterrupt` is
    /// returned as an error for the loop to propagate; any other exception goes to the
    /// loop's exception handler.
    ///
    /// A one-shot handle outside debug mode gives its callback up as it runs (it will
    /// not need it again), which saves taking extra references; it is put back for the
    /// exception handler if the callback raises.
    ///
    /// `scratch` is the running loop's reusable empty context (see [`ScratchContext`]);
    /// without it, a callback that needs a fresh empty context gets a new one.
    pub(crate) fn run(slf: &Bound<'_, Self>, scratch: Option<&mut ScratchContext>) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        let give_up = this.oneshot && !this.debug;
        let cb = if give_up {
            this.take_callback()
        } else {
            this.callback.lock().as_ref().map(|cb| cb.clone_ref(py))
        };
        let Some(cb) = cb else {
            return Ok(());
        };
        let func = cb.func.bind(py);
        let ok = match this.context.get(py) {
            Some(context) => run_in_context(py, &context, || cb.args.call(func)),
            None => this.run_in_fresh_context(slf, scratch, || cb.args.call(func)),
        };
        if ok {
            cb.release(py);
            return Ok(());
        }
        Self::report(slf, give_up, cb, PyErr::fetch(py))
    }

    /// The callback of [`Handle::run`] raised `err`: a `SystemExit`/`KeyboardInterrupt`
    /// is returned, anything else goes to the loop's exception handler.
    #[cold]
    #[inline(never)]
    fn report(slf: &Bound<'_, Self>, give_up: bool, cb: Callback, err: PyErr) -> PyResult<()> {
        let py = slf.py();
        let this = slf.get();
        if is_fatal(py, &err) {
            cb.release(py);
            return Err(err);
        }
        let func = cb.func.bind(py);
        let args = cb.args.to_tuple(py)?;
        let text = pyhelpers::format_callback_source(py, func, &args)?;
        let ctx = PyDict::new(py);
        ctx.set_item(
            intern!(py, "message"),
            format!("Exception in callback {text}"),
        )?;
        ctx.set_item(intern!(py, "exception"), err.into_value(py))?;
        ctx.set_item(intern!(py, "handle"), slf)?;
        if let Some(tb) = this
            .debug_state
            .as_ref()
            .and_then(|d| d.source_traceback.as_ref())
        {
            ctx.set_item(intern!(py, "source_traceback"), tb)?;
        }
        // The handler may show the handle: let it see the callback, as the stdlib's does.
        this.put_back(give_up, &cb, py);
        cb.release(py);
        let reported = this
            .loop_
            .bind(py)
            .call_method1(intern!(py, "call_exception_handler"), (ctx,));
        if give_up {
            drop(this.take_callback());
        }
        reported.map(drop)
    }

    /// Runs `f` for a handle whose context was captured empty and not made yet: in a new
    /// empty context, which is all a copy of an empty context can be.
    ///
    /// If someone besides the ready queue holds the handle (and so could ask for its
    /// context), the context is made and kept in the handle. Otherwise nothing can
    /// ever see it, and the loop's scratch context serves (see [`ScratchContext`]).
    #[inline]
    fn run_in_fresh_context(
        &self,
        slf: &Bound<'_, Self>,
        scratch: Option<&mut ScratchContext>,
        f: impl FnOnce() -> bool,
    ) -> bool {
        let py = slf.py();
        // SAFETY: `slf` is a live object.
        let context = if unsafe { ffi::Py_REFCNT(slf.as_ptr()) } > 1 {
            self.context.materialize(py)
        } else if let Some(scratch) = scratch {
            let Some(context) = scratch.take(py) else {
                return false;
            };
            let ok = run_in_context(py, &context, f);
            if !ok {
                self.keep_for_handler(&context);
            }
            scratch.give_back(context);
            return ok;
        } else {
            // SAFETY: the result is a new reference or NULL with an exception set.
            unsafe { Bound::from_owned_ptr_or_err(py, ffi::PyContext_New()) }
        };
        match context {
            Ok(context) => {
                let ok = run_in_context(py, &context, f);
                if !ok {
                    self.keep_for_handler(&context);
                }
                ok
            }
            Err(err) => {
                err.restore(py);
                false
            }
        }
    }

    /// The callback raised in `context`, a context the handle did not keep: keep it now.
    /// From 3.12 the exception handler runs in the handle's context, which must be the
    /// one the callback ran in (and set variables in), not a new empty one. (Kept, it is
    /// no longer reused as the scratch context: the handle holds a reference.)
    #[cold]
    fn keep_for_handler(&self, context: &Bound<'_, PyAny>) {
        self.context.adopt(context);
    }

    /// Returns a callback given up by [`Handle::run`] to its slot, unless the handle was
    /// cancelled (or its slot refilled) meanwhile.
    fn put_back(&self, given_up: bool, cb: &Callback, py: Python<'_>) {
        if !given_up || self.is_cancelled() {
            return;
        }
        let cb = cb.clone_ref(py);
        let mut slot = self.callback.lock();
        if slot.is_none() {
            *slot = Some(cb);
        } else {
            drop(slot);
            cb.release(py);
        }
    }

    fn repr_text(slf: &Bound<'_, Self>, with_cache: bool) -> PyResult<String> {
        let py = slf.py();
        let this = slf.get();
        if with_cache {
            if let Some(d) = &this.debug_state {
                if let Some(r) = &*lock(&d.repr_at_cancel) {
                    return Ok(r.clone());
                }
            }
        }
        let mut info: Vec<String> = vec![slf.get_type().name()?.to_string()];
        if this.is_cancelled() {
            info.push("cancelled".into());
        }
        if this.timer {
            // SAFETY: only timer handles have `timer` set.
            let when = unsafe { slf.cast_unchecked::<TimerHandle>() }.get().when;
            info.push(format!("when={}", py_float_repr(py, when)?));
        }
        let cb = this.callback.lock().as_ref().map(|c| c.clone_ref(py));
        if let Some(cb) = cb {
            info.push(pyhelpers::format_callback_source(
                py,
                cb.func.bind(py),
                &cb.args.to_tuple(py)?,
            )?);
        }
        if let Some(tb) = this
            .debug_state
            .as_ref()
            .and_then(|d| d.source_traceback.as_ref())
        {
            let tb = tb.bind(py);
            if tb.len()? > 0 {
                let frame = tb.get_item(-1)?;
                let file: String = frame.get_item(0)?.str()?.to_string();
                let line: String = frame.get_item(1)?.str()?.to_string();
                info.push(format!("created at {file}:{line}"));
            }
        }
        Ok(format!("<{}>", info.join(" ")))
    }
}

fn py_float_repr(py: Python<'_>, v: f64) -> PyResult<String> {
    Ok(pyo3::types::PyFloat::new(py, v).repr()?.to_string())
}

/// Calls `f` with `context` entered, like `context.run(f)`.
///
/// Errors follow the C API's convention, which keeps the per-callback path free of
/// `PyErr` values: `f` and this function return false with the exception left set in
/// the interpreter, for the caller to fetch. If `f` fails, its exception is the one
/// reported, whatever leaving the context does.
#[inline]
fn run_in_context(py: Python<'_>, context: &Bound<'_, PyAny>, f: impl FnOnce() -> bool) -> bool {
    let ctx = context.as_ptr();
    // SAFETY: `ctx` is a live object; PyContext_Enter type-checks it and fails with an
    // exception set (e.g. the context is already entered) without side effects.
    if unsafe { ffi::PyContext_Enter(ctx) } < 0 {
        return false;
    }
    if !f() {
        exit_after_error(py, ctx);
        return false;
    }
    // SAFETY: we entered `ctx` above on this thread, so exiting it is balanced; on
    // failure the exception is set.
    unsafe { ffi::PyContext_Exit(ctx) >= 0 }
}

/// Leaves `ctx` after the function run in it raised, keeping that exception.
#[cold]
#[inline(never)]
fn exit_after_error(py: Python<'_>, ctx: *mut ffi::PyObject) {
    let err = PyErr::fetch(py);
    // SAFETY: `ctx` was entered by `run_in_context` on this thread; exiting it is
    // balanced. Its own error, if any, is dropped in favour of `err`.
    if unsafe { ffi::PyContext_Exit(ctx) } < 0 {
        drop(PyErr::fetch(py));
    }
    err.restore(py);
}

impl Timer for Py<TimerHandle> {
    fn is_cancelled(&self) -> bool {
        TimerHandle::base(self).get().is_cancelled()
    }
    fn unschedule(&self) {
        self.get().scheduled.store(false, Ordering::Relaxed);
    }
}

#[pymethods]
impl Handle {
    /// Cancels the callback; it will not run. Idempotent.
    fn cancel(slf: &Bound<'_, Self>) -> PyResult<()> {
        Handle::cancel_now(slf)
    }

    /// True if the handle was cancelled.
    fn cancelled(&self) -> bool {
        self.is_cancelled()
    }

    /// The `contextvars.Context` the callback runs in.
    fn get_context(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.context(py)
    }

    /// Runs the callback now, as the loop would.
    fn _run(slf: &Bound<'_, Self>) -> PyResult<()> {
        Handle::run(slf, None)
    }

    #[getter]
    fn _callback(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.callback.lock().as_ref().map(|c| c.func.clone_ref(py))
    }

    #[getter]
    fn _args<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let args = self.callback.lock().as_ref().map(|c| c.args.clone_ref(py));
        args.map(|a| a.to_tuple(py)).transpose()
    }

    #[getter]
    fn _cancelled(&self) -> bool {
        self.is_cancelled()
    }

    #[getter]
    fn _context(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.context(py)
    }

    #[getter]
    fn _loop(&self, py: Python<'_>) -> Py<PyAny> {
        self.loop_.clone_ref(py)
    }

    #[getter]
    fn _source_traceback(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.debug_state
            .as_ref()
            .and_then(|d| d.source_traceback.as_ref())
            .map(|t| t.clone_ref(py))
    }

    fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
        Handle::repr_text(slf, true)
    }
}

#[pymethods]
impl TimerHandle {
    /// The absolute deadline, in `loop.time()` seconds.
    fn when<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self._when(py)
    }

    #[getter]
    fn _when<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        if self.int {
            // Exact: `call_at` checked that the int survives the round trip.
            Ok((self.when as i64).into_pyobject(py)?.into_any())
        } else {
            Ok(self.when.into_pyobject(py)?.into_any())
        }
    }

    #[getter]
    fn _scheduled(&self) -> bool {
        self.scheduled.load(Ordering::Relaxed)
    }

    fn __lt__(&self, other: &Bound<'_, Self>) -> bool {
        self.when < other.get().when
    }

    fn __le__(&self, other: &Bound<'_, Self>) -> bool {
        self.when <= other.get().when
    }

    fn __gt__(&self, other: &Bound<'_, Self>) -> bool {
        self.when > other.get().when
    }

    fn __ge__(&self, other: &Bound<'_, Self>) -> bool {
        self.when >= other.get().when
    }
}
