//! Python objects the core looks up once and keeps: the stdlib helpers it defers to for
//! text that users compare against (callback formatting, stack extraction).

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyTuple;

/// `module.attr`, imported once and kept in `cell`.
pub(crate) fn cached<'py>(
    py: Python<'py>,
    cell: &'static PyOnceLock<Py<PyAny>>,
    module: &str,
    attr: &str,
) -> PyResult<&'py Bound<'py, PyAny>> {
    cell.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.import(module)?.getattr(attr)?.unbind())
    })
    .map(|o| o.bind(py))
}

/// `asyncio.format_helpers._format_callback_source(callback, args)`: the text the stdlib
/// puts in handle reprs and in "Exception in callback ..." messages.
pub fn format_callback_source(
    py: Python<'_>,
    callback: &Bound<'_, PyAny>,
    args: &Bound<'_, PyTuple>,
) -> PyResult<String> {
    static F: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    cached(py, &F, "asyncio.format_helpers", "_format_callback_source")?
        .call1((callback, args))?
        .extract()
}

/// The caller's stack as `asyncio.format_helpers.extract_stack` gives it (debug mode);
/// `None` when called from a thread with no Python frame (a native worker thread).
pub fn extract_caller_stack(py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
    static F: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    static GETFRAME: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    // With no Python frame of our own, frame 0 is the Python code that called us.
    let Ok(frame) = cached(py, &GETFRAME, "sys", "_getframe")?.call1((0,)) else {
        return Ok(None);
    };
    Ok(Some(
        cached(py, &F, "asyncio.format_helpers", "extract_stack")?
            .call1((frame,))?
            .unbind(),
    ))
}

/// `callable(*args, **dict(zip(kwnames, kwvalues)))` through vectorcall, with the keyword
/// names interned once in `names`.
pub(crate) fn call_with_keywords<'py>(
    callable: &Bound<'py, PyAny>,
    args: &[&Bound<'py, PyAny>],
    names: &'static PyOnceLock<Py<PyTuple>>,
    keys: &[&str],
    values: &[&Bound<'py, PyAny>],
) -> PyResult<Bound<'py, PyAny>> {
    let py = callable.py();
    debug_assert_eq!(keys.len(), values.len());
    let kwnames = names.get_or_try_init(py, || PyTuple::new(py, keys).map(Bound::unbind))?;
    let all: Vec<*mut pyo3::ffi::PyObject> =
        args.iter().chain(values).map(|o| o.as_ptr()).collect();
    // SAFETY: `all` holds `args.len()` positional then `keys.len()` keyword values, every
    // one a live reference for the duration of the call; `kwnames` names the latter.
    unsafe {
        Bound::from_owned_ptr_or_err(
            py,
            pyo3::ffi::PyObject_Vectorcall(
                callable.as_ptr(),
                all.as_ptr(),
                args.len(),
                kwnames.as_ptr(),
            ),
        )
    }
}
