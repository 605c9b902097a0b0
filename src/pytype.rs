//! Native classes that derive from asyncio's Python transport classes.
//!
//! Transports must be real `asyncio.Transport` (`ReadTransport`, `DatagramTransport`, …)
//! instances: libraries check `isinstance`, and subclassing is what the stdlib documents.
//! A PyO3 class cannot have a Python base, and cannot be a co-base with one either
//! (`BaseTransport` has `__slots__ = ('_extra',)`, an instance lay-out conflict). So these
//! classes are built here with `PyType_FromSpecWithBases`: the base is the asyncio class,
//! the methods are C-level method descriptors (called without a Python frame, like any
//! builtin method), and each instance carries a pointer to its Rust state.
//!
//! Instance lay-out: the base's fields (`_extra`), then `__dict__`, `__weakref__` and the
//! state pointer, at fixed offsets from the end of the object. The classes are final (no
//! `Py_TPFLAGS_BASETYPE`), so `Py_TYPE(obj)->tp_basicsize` locates those fields.
//!
//! The state is never replaced after creation and is dropped only in `tp_dealloc`, so a
//! reference to it lives as long as the object it was read from.

use std::ffi::{c_int, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr;

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::panic::PanicException;
use pyo3::prelude::*;
use pyo3::types::{PyTuple, PyType};

const PTR: isize = std::mem::size_of::<*mut c_void>() as isize;
/// `__dict__`, `__weakref__`, state: counted back from `tp_basicsize`.
const DICT_FROM_END: isize = 3 * PTR;
const WEAKLIST_FROM_END: isize = 2 * PTR;
const STATE_FROM_END: isize = PTR;

/// What a native class's Rust state must provide for the garbage collector and for
/// finalization.
pub trait NativeState: Sized + Send + Sync + 'static {
    /// Visits every Python object the state holds (`tp_traverse`).
    fn traverse(&self, visit: &Visit) -> c_int;
    /// Drops the references that can form cycles (`tp_clear`).
    fn clear(&self, py: Python<'_>);
    /// `tp_finalize`: runs once before the object is freed (e.g. "unclosed transport").
    fn finalize(obj: &Bound<'_, PyAny>, state: &Self);
    /// `tp_repr`.
    fn repr(obj: &Bound<'_, PyAny>, state: &Self) -> PyResult<String>;
}

/// A `visitproc` and its argument, as handed to `tp_traverse`.
pub struct Visit {
    visit: ffi::visitproc,
    arg: *mut c_void,
}

impl Visit {
    /// Visits `obj`; a non-zero result must be returned from the traversal at once.
    pub fn call<T>(&self, obj: &Py<T>) -> c_int {
        // SAFETY: `visit`/`arg` come from the collector, `obj` is a live reference.
        unsafe { (self.visit)(obj.as_ptr(), self.arg) }
    }

    /// Visits the object at `ptr` unless it is null.
    ///
    /// # Safety
    /// `ptr` is null or a live object the traversed instance holds a reference to.
    pub unsafe fn ptr(&self, ptr: *mut ffi::PyObject) -> c_int {
        if ptr.is_null() {
            return 0;
        }
        // SAFETY: `visit`/`arg` come from the collector, `ptr` is live (caller).
        unsafe { (self.visit)(ptr, self.arg) }
    }

    /// Visits `obj` if present.
    pub fn opt<T>(&self, obj: &Option<Py<T>>) -> c_int {
        obj.as_ref().map_or(0, |o| self.call(o))
    }
}

/// Positional and keyword arguments of a vectorcall method.
pub struct Args<'a, 'py> {
    py: Python<'py>,
    positional: &'a [*mut ffi::PyObject],
    kwnames: *mut ffi::PyObject,
    kwvalues: &'a [*mut ffi::PyObject],
}

impl<'py> Args<'_, 'py> {
    /// Binds the arguments to `names` (the first `required` mandatory), the way a Python
    /// signature `(a, b=None, ...)` would.
    pub fn parse<const N: usize>(
        &self,
        func: &str,
        names: [&str; N],
        required: usize,
    ) -> PyResult<[Option<Bound<'py, PyAny>>; N]> {
        let py = self.py;
        if self.positional.len() > N {
            return Err(PyTypeError::new_err(format!(
                "{func}() takes at most {N} arguments ({} given)",
                self.positional.len()
            )));
        }
        let mut out: [Option<Bound<'py, PyAny>>; N] = std::array::from_fn(|_| None);
        for (slot, &p) in out.iter_mut().zip(self.positional) {
            // SAFETY: CPython passes borrowed, live argument pointers.
            *slot = Some(unsafe { Bound::from_borrowed_ptr(py, p) });
        }
        if !self.kwnames.is_null() {
            // SAFETY: kwnames is a live tuple of str when non-null.
            let kwnames = unsafe { Bound::from_borrowed_ptr(py, self.kwnames) };
            let kwnames = kwnames.cast_into::<PyTuple>()?;
            for (name, &value) in kwnames.iter().zip(self.kwvalues) {
                let name: String = name.extract()?;
                let Some(i) = names.iter().position(|n| *n == name) else {
                    return Err(PyTypeError::new_err(format!(
                        "{func}() got an unexpected keyword argument '{name}'"
                    )));
                };
                if out[i].is_some() {
                    return Err(PyTypeError::new_err(format!(
                        "{func}() got multiple values for argument '{name}'"
                    )));
                }
                // SAFETY: as above.
                out[i] = Some(unsafe { Bound::from_borrowed_ptr(py, value) });
            }
        }
        if let Some(missing) = out[..required].iter().position(Option::is_none) {
            return Err(PyTypeError::new_err(format!(
                "{func}() missing required argument '{}'",
                names[missing]
            )));
        }
        Ok(out)
    }

    /// Checks that no argument was given.
    #[inline]
    pub fn none(&self, func: &str) -> PyResult<()> {
        // `is_closing()` and the like are called per request: skip the general binding.
        if self.positional.is_empty() && self.kwnames.is_null() {
            return Ok(());
        }
        self.parse(func, [], 0).map(drop)
    }
}

/// The body of a native method: `(self, state, args) -> result`.
pub type Method<S> = for<'py> fn(&Bound<'py, PyAny>, &S, &Args<'_, 'py>) -> PyResult<Py<PyAny>>;

/// The C entry point of every native method: restores the Rust types, turns errors into
/// a raised exception and a panic into `PanicException` (never unwinding into C).
///
/// # Safety
/// Only for CPython's `METH_FASTCALL | METH_KEYWORDS` calling convention, with `slf` an
/// instance of a class created by [`create_type`] for state `S`.
pub unsafe fn fastcall<S: NativeState>(
    slf: *mut ffi::PyObject,
    args: *const *mut ffi::PyObject,
    nargs: ffi::Py_ssize_t,
    kwnames: *mut ffi::PyObject,
    body: Method<S>,
) -> *mut ffi::PyObject {
    // SAFETY: CPython calls methods with the interpreter attached.
    let py = unsafe { Python::assume_attached() };
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `slf` is a live instance of our class (the method descriptor checked
        // its type); the argument vector holds `nargs` positional values followed by one
        // value per keyword name.
        let obj = unsafe { Bound::from_borrowed_ptr(py, slf) };
        let nargs = ffi::PyVectorcall_NARGS(nargs as usize) as usize;
        let nkw = if kwnames.is_null() {
            0
        } else {
            // SAFETY: kwnames is a live tuple when non-null.
            unsafe { ffi::PyTuple_GET_SIZE(kwnames) as usize }
        };
        let all: &[*mut ffi::PyObject] = if nargs + nkw == 0 {
            &[]
        } else {
            // SAFETY: as documented by the vectorcall protocol.
            unsafe { std::slice::from_raw_parts(args, nargs + nkw) }
        };
        let args = Args {
            py,
            positional: &all[..nargs],
            kwnames,
            kwvalues: &all[nargs..],
        };
        // SAFETY: see above.
        let state = unsafe { state::<S>(&obj) }?;
        body(&obj, state, &args)
    }));
    match result {
        Ok(Ok(v)) => v.into_ptr(),
        Ok(Err(e)) => {
            e.restore(py);
            ptr::null_mut()
        }
        Err(payload) => {
            panic_error(payload).restore(py);
            ptr::null_mut()
        }
    }
}

/// A panic caught at the C boundary, as the `PanicException` PyO3 raises for its own.
fn panic_error(payload: Box<dyn std::any::Any + Send>) -> PyErr {
    let msg = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic in native code".to_owned());
    PanicException::new_err(msg)
}

/// Declares the `extern "C"` entry point `$name` for native method `$body` on state `$S`.
#[macro_export]
macro_rules! native_method {
    ($name:ident, $S:ty, $body:path) => {
        unsafe extern "C" fn $name(
            slf: *mut pyo3::ffi::PyObject,
            args: *const *mut pyo3::ffi::PyObject,
            nargs: pyo3::ffi::Py_ssize_t,
            kwnames: *mut pyo3::ffi::PyObject,
        ) -> *mut pyo3::ffi::PyObject {
            // SAFETY: installed only in the method table of a class of state `$S`.
            unsafe { $crate::pytype::fastcall::<$S>(slf, args, nargs, kwnames, $body) }
        }
    };
}

/// One entry of a native class's method table.
#[derive(Clone, Copy)]
pub struct MethodSpec {
    pub name: &'static CStr,
    pub func: ffi::PyCFunctionFastWithKeywords,
    pub doc: &'static CStr,
}

/// Address of one of our trailing fields.
///
/// # Safety
/// `obj` must be a live instance of a class made by [`create_type`].
unsafe fn field(obj: *mut ffi::PyObject, from_end: isize) -> *mut *mut ffi::PyObject {
    // SAFETY: the classes are final, so `tp_basicsize` is the size of this lay-out,
    // whose last three pointer-sized fields are ours.
    unsafe {
        let size = (*ffi::Py_TYPE(obj)).tp_basicsize;
        obj.cast::<u8>().offset(size - from_end).cast()
    }
}

/// The Rust state of `obj`.
///
/// # Safety
/// `obj` must be an instance of a class made by [`create_type`] for state `S`.
pub unsafe fn state<'a, S: NativeState>(obj: &'a Bound<'_, PyAny>) -> PyResult<&'a S> {
    // SAFETY: the state pointer is set once in `new_instance` to a leaked `Box<S>` and
    // freed only in tp_dealloc, after which `obj` cannot be borrowed.
    unsafe { (*field(obj.as_ptr(), STATE_FROM_END) as *const S).as_ref() }
        .ok_or_else(|| PyValueError::new_err("uninitialized native object"))
}

/// Offset of `BaseTransport._extra` (the base's only slot), read from its descriptor.
static EXTRA_OFFSET: std::sync::OnceLock<isize> = std::sync::OnceLock::new();

fn extra_slot(obj: *mut ffi::PyObject) -> Option<*mut *mut ffi::PyObject> {
    let off = *EXTRA_OFFSET.get()?;
    // SAFETY: the offset is that of a PyObject* member of the base lay-out.
    Some(unsafe { obj.cast::<u8>().offset(off).cast() })
}

unsafe extern "C" fn tp_traverse<S: NativeState>(
    obj: *mut ffi::PyObject,
    visit: ffi::visitproc,
    arg: *mut c_void,
) -> c_int {
    let v = Visit { visit, arg };
    // SAFETY: called by the collector on a live instance of our class.
    unsafe {
        // Heap types own a reference from each instance.
        let r = visit(ffi::Py_TYPE(obj).cast(), arg);
        if r != 0 {
            return r;
        }
        for slot in [Some(field(obj, DICT_FROM_END)), extra_slot(obj)]
            .into_iter()
            .flatten()
        {
            if !(*slot).is_null() {
                let r = visit(*slot, arg);
                if r != 0 {
                    return r;
                }
            }
        }
        match (*field(obj, STATE_FROM_END) as *const S).as_ref() {
            Some(s) => s.traverse(&v),
            None => 0,
        }
    }
}

unsafe extern "C" fn tp_clear<S: NativeState>(obj: *mut ffi::PyObject) -> c_int {
    // SAFETY: called by the collector (interpreter attached) on a live instance.
    unsafe {
        let py = Python::assume_attached();
        for slot in [Some(field(obj, DICT_FROM_END)), extra_slot(obj)]
            .into_iter()
            .flatten()
        {
            let old = std::mem::replace(&mut *slot, ptr::null_mut());
            if !old.is_null() {
                ffi::Py_DECREF(old);
            }
        }
        if let Some(s) = (*field(obj, STATE_FROM_END) as *const S).as_ref() {
            // `attach_unchecked`: see tp_dealloc.
            Python::attach_unchecked(|_| {
                let _ = catch_unwind(AssertUnwindSafe(|| s.clear(py)));
            });
        }
    }
    0
}

unsafe extern "C" fn tp_finalize<S: NativeState>(obj: *mut ffi::PyObject) {
    // SAFETY: called with the interpreter attached on a live instance.
    let py = unsafe { Python::assume_attached() };
    // A finalizer must leave the current exception as it found it.
    let saved = PyErr::take(py);
    // SAFETY: `obj` is live for the duration of the call.
    let bound = unsafe { Bound::from_borrowed_ptr(py, obj) };
    // SAFETY: tp_finalize of our class.
    if let Ok(state) = unsafe { state::<S>(&bound) } {
        if let Err(payload) = catch_unwind(AssertUnwindSafe(|| S::finalize(&bound, state))) {
            panic_error(payload).write_unraisable(py, Some(&bound));
        }
    }
    if let Some(e) = saved {
        e.restore(py);
    }
}

unsafe extern "C" fn tp_dealloc<S: NativeState>(obj: *mut ffi::PyObject) {
    // SAFETY: CPython's deallocation protocol for a GC heap type with a finalizer.
    unsafe {
        if ffi::PyObject_CallFinalizerFromDealloc(obj) < 0 {
            return; // resurrected
        }
        let tp = ffi::Py_TYPE(obj);
        ffi::PyObject_GC_UnTrack(obj.cast());
        if !(*field(obj, WEAKLIST_FROM_END)).is_null() {
            ffi::PyObject_ClearWeakRefs(obj);
        }
        for slot in [Some(field(obj, DICT_FROM_END)), extra_slot(obj)]
            .into_iter()
            .flatten()
        {
            let old = std::mem::replace(&mut *slot, ptr::null_mut());
            if !old.is_null() {
                ffi::Py_DECREF(old);
            }
        }
        let state = std::mem::replace(&mut *field(obj, STATE_FROM_END), ptr::null_mut());
        if !state.is_null() {
            // Inside an attach, so the state's Python references are released now: outside
            // any PyO3 call, PyO3 would only queue them until its next entry. The thread
            // is attached already (CPython deallocates with it attached), so PyO3's checks
            // of the interpreter's state are skipped: they fail while the interpreter
            // finalizes (`Py_IsInitialized()` is 0 then, and PyO3 panics on a first
            // attach, or on any attach from 3.13 on), which is when a cycle left over at
            // exit is collected -- a panic here would abort the process.
            Python::attach_unchecked(|_| drop(Box::from_raw(state.cast::<S>())));
        }
        let free = (*tp).tp_free.expect("heap types have tp_free");
        free(obj.cast());
        ffi::Py_DECREF(tp.cast());
    }
}

unsafe extern "C" fn tp_repr<S: NativeState>(obj: *mut ffi::PyObject) -> *mut ffi::PyObject {
    // SAFETY: called with the interpreter attached on a live instance.
    let py = unsafe { Python::assume_attached() };
    // SAFETY: as above.
    let bound = unsafe { Bound::from_borrowed_ptr(py, obj) };
    // SAFETY: tp_repr of our class.
    let result = catch_unwind(AssertUnwindSafe(|| {
        S::repr(&bound, unsafe { state::<S>(&bound) }?)
    }));
    match result {
        Ok(Ok(s)) => pyo3::types::PyString::new(py, &s).into_ptr(),
        Ok(Err(e)) => {
            e.restore(py);
            ptr::null_mut()
        }
        Err(payload) => {
            panic_error(payload).restore(py);
            ptr::null_mut()
        }
    }
}

/// Creates the final class `name` (a dotted `module.Class`) deriving from `base`, with
/// `methods`, for instances carrying state `S`.
pub fn create_type<S: NativeState>(
    base: &Bound<'_, PyType>,
    name: &'static CStr,
    doc: &'static CStr,
    methods: &[MethodSpec],
) -> PyResult<Py<PyType>> {
    create_type_with_bases::<S>(std::slice::from_ref(base), name, doc, methods)
}

/// [`create_type`] with several bases, e.g. `(Transport, DatagramTransport)`: they must
/// share one instance lay-out (asyncio's transport classes add no slot below
/// `BaseTransport`), which `PyType_FromSpecWithBases` checks.
pub fn create_type_with_bases<S: NativeState>(
    bases: &[Bound<'_, PyType>],
    name: &'static CStr,
    doc: &'static CStr,
    methods: &[MethodSpec],
) -> PyResult<Py<PyType>> {
    let Some(base) = bases.first() else {
        return Err(PyTypeError::new_err("a native class needs a base"));
    };
    let py = base.py();
    if EXTRA_OFFSET.get().is_none() {
        let descr = py
            .import("asyncio.transports")?
            .getattr("BaseTransport")?
            .getattr("__dict__")?
            .get_item("_extra")?;
        let member_type = py.import("types")?.getattr("MemberDescriptorType")?;
        if !descr.is_instance(&member_type)? {
            return Err(PyTypeError::new_err("BaseTransport._extra is not a slot"));
        }
        // SAFETY: a member descriptor's object lay-out is PyMemberDescrObject.
        let off =
            unsafe { (*(*descr.as_ptr().cast::<ffi::PyMemberDescrObject>()).d_member).offset };
        let _ = EXTRA_OFFSET.set(off);
    }
    let base_size = bases
        .iter()
        // SAFETY: each base is a type object.
        .map(|b| unsafe { (*b.as_ptr().cast::<ffi::PyTypeObject>()).tp_basicsize })
        .max()
        .unwrap_or(0);
    let basicsize = base_size + 3 * PTR;

    // The tables must outlive the class: leaked once per class (a handful per process).
    let mut defs: Vec<ffi::PyMethodDef> = methods
        .iter()
        .map(|m| ffi::PyMethodDef {
            ml_name: m.name.as_ptr(),
            ml_meth: ffi::PyMethodDefPointer {
                PyCFunctionFastWithKeywords: m.func,
            },
            ml_flags: ffi::METH_FASTCALL | ffi::METH_KEYWORDS,
            ml_doc: m.doc.as_ptr(),
        })
        .collect();
    defs.push(ffi::PyMethodDef::zeroed());
    let defs = Box::leak(defs.into_boxed_slice());
    let members = Box::leak(Box::new([
        member(c"__dictoffset__", basicsize - DICT_FROM_END),
        member(c"__weaklistoffset__", basicsize - WEAKLIST_FROM_END),
        // SAFETY: an all-zero PyMemberDef is the table's sentinel.
        unsafe { std::mem::zeroed() },
    ]));
    let slots = Box::leak(Box::new([
        slot(ffi::Py_tp_dealloc, tp_dealloc::<S> as *mut c_void),
        slot(ffi::Py_tp_traverse, tp_traverse::<S> as *mut c_void),
        slot(ffi::Py_tp_clear, tp_clear::<S> as *mut c_void),
        slot(ffi::Py_tp_finalize, tp_finalize::<S> as *mut c_void),
        slot(ffi::Py_tp_repr, tp_repr::<S> as *mut c_void),
        slot(ffi::Py_tp_methods, defs.as_mut_ptr().cast()),
        slot(ffi::Py_tp_members, members.as_mut_ptr().cast()),
        slot(ffi::Py_tp_doc, doc.as_ptr() as *mut c_void),
        slot(0, ptr::null_mut()),
    ]));
    let spec = Box::leak(Box::new(ffi::PyType_Spec {
        name: name.as_ptr(),
        basicsize: basicsize as c_int,
        itemsize: 0,
        flags: (ffi::Py_TPFLAGS_DEFAULT
            | ffi::Py_TPFLAGS_HAVE_GC
            | ffi::Py_TPFLAGS_DISALLOW_INSTANTIATION) as _,
        slots: slots.as_mut_ptr(),
    }));
    let bases = PyTuple::new(py, bases)?;
    // SAFETY: the spec and its tables are valid and 'static; `bases` is a tuple of types.
    let ty = unsafe { ffi::PyType_FromSpecWithBases(spec, bases.as_ptr()) };
    if ty.is_null() {
        return Err(PyErr::fetch(py));
    }
    // SAFETY: a new reference to a type object.
    Ok(unsafe { Bound::from_owned_ptr(py, ty) }
        .cast_into::<PyType>()?
        .unbind())
}

fn member(name: &'static CStr, offset: isize) -> ffi::PyMemberDef {
    ffi::PyMemberDef {
        name: name.as_ptr(),
        type_code: ffi::Py_T_PYSSIZET,
        offset,
        flags: ffi::Py_READONLY,
        doc: ptr::null(),
    }
}

fn slot(slot: c_int, pfunc: *mut c_void) -> ffi::PyType_Slot {
    ffi::PyType_Slot { slot, pfunc }
}

/// A new instance of `ty` (created by [`create_type`] for `S`) owning `state`.
pub fn new_instance<'py, S: NativeState>(
    ty: &Bound<'py, PyType>,
    state: S,
) -> PyResult<Bound<'py, PyAny>> {
    let py = ty.py();
    // SAFETY: GenericAlloc zero-fills (null dict, weaklist and state) and, for a GC
    // type, starts tracking the object; the state pointer (and the dict, made first so
    // that nothing can fail once the object exists) is set before anything can call a
    // method on it (a collection in between sees a null state and skips it).
    unsafe {
        let dict = if eager_dict(py) {
            let dict = ffi::PyDict_New();
            if dict.is_null() {
                return Err(PyErr::fetch(py));
            }
            dict
        } else {
            ptr::null_mut()
        };
        let obj = ffi::PyType_GenericAlloc(ty.as_ptr().cast(), 0);
        if obj.is_null() {
            ffi::Py_XDECREF(dict);
            return Err(PyErr::fetch(py));
        }
        *field(obj, STATE_FROM_END) = Box::into_raw(Box::new(state)).cast();
        *field(obj, DICT_FROM_END) = dict;
        Ok(Bound::from_owned_ptr(py, obj))
    }
}

/// Whether instances get their (empty) `__dict__` when they are created: on Python 3.11,
/// whose interpreter specializes a method call such as `transport.write(data)` only for
/// an instance whose dict exists (3.12 has a form for a dict not made yet). Without it
/// every such call takes the generic lookup: about 116 instructions more per request of a
/// 1 KiB protocol echo (callgrind, 2,676 against 2,560), for 64 bytes per transport.
fn eager_dict(py: Python<'_>) -> bool {
    static EAGER: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *EAGER.get_or_init(|| py.version_info() < (3, 12))
}
