//! Socket addresses between libc and Python, converted as the `socket` module converts
//! them, so a transport can call `recvfrom`/`sendto` on the raw fd and still hand the
//! protocol exactly the objects `sock.recvfrom()` would have produced.
//!
//! Python to libc covers the common cases only (a numeric IPv4/IPv6 host with int port,
//! a Unix path as `str` or `bytes`); anything else (host names, `''`, `'<broadcast>'`,
//! wrong types) is left to the socket object, so its resolution rules and error messages
//! stay the socket module's own.

use std::ffi::{c_char, CString};
use std::mem::{size_of, zeroed};

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyInt, PyString, PyTuple};

// The libc crate does not bind these; CPython calls them, so the text matches its own.
extern "C" {
    fn inet_ntop(
        af: libc::c_int,
        src: *const libc::c_void,
        dst: *mut c_char,
        size: libc::socklen_t,
    ) -> *const c_char;
    fn inet_pton(af: libc::c_int, src: *const c_char, dst: *mut libc::c_void) -> libc::c_int;
}

/// `INET6_ADDRSTRLEN` from `<netinet/in.h>`: room for any textual address.
const INET6_ADDRSTRLEN: usize = 46;

/// `offsetof(struct sockaddr_un, sun_path)`.
const SUN_PATH_OFFSET: usize = size_of::<libc::sa_family_t>();

/// A socket address in a `sockaddr_storage`, with its length.
#[derive(Clone, Copy)]
pub struct SockAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl SockAddr {
    /// An all-zero address with room for any family: the out-parameter of `recvfrom`.
    pub fn empty() -> Self {
        Self {
            // SAFETY: all-zero is a valid sockaddr_storage.
            storage: unsafe { zeroed() },
            len: size_of::<libc::sockaddr_storage>() as libc::socklen_t,
        }
    }

    /// Pointer and length for `recvfrom`/`getpeername`-style out-parameters.
    pub fn as_mut_parts(&mut self) -> (*mut libc::sockaddr, *mut libc::socklen_t) {
        (
            (&mut self.storage as *mut libc::sockaddr_storage).cast(),
            &mut self.len,
        )
    }

    /// Pointer and length for `sendto`.
    pub fn as_parts(&self) -> (*const libc::sockaddr, libc::socklen_t) {
        (
            (&self.storage as *const libc::sockaddr_storage).cast(),
            self.len,
        )
    }

    fn bytes(&self) -> &[u8] {
        let len = (self.len as usize).min(size_of::<libc::sockaddr_storage>());
        // SAFETY: `storage` is plain data at least `len` bytes long.
        unsafe {
            std::slice::from_raw_parts(
                (&self.storage as *const libc::sockaddr_storage).cast::<u8>(),
                len,
            )
        }
    }

    /// Same family, length and bytes: the same peer.
    pub fn same_as(&self, other: &SockAddr) -> bool {
        self.len == other.len && self.bytes() == other.bytes()
    }

    /// The object `socket.recvfrom` returns for this address (CPython's
    /// `makesockaddr`): `(host, port)` for AF_INET, `(host, port, flowinfo, scope_id)`
    /// for AF_INET6, a `str` path or `bytes` abstract name for AF_UNIX, None when the
    /// kernel gave no address (an unbound Unix sender).
    pub fn to_python<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        if self.len == 0 {
            return Ok(py.None().into_bound(py));
        }
        match c_int_family(self.storage.ss_family) {
            libc::AF_INET => {
                // SAFETY: the kernel wrote a sockaddr_in for this family.
                let sin = unsafe { &*(&self.storage as *const _ as *const libc::sockaddr_in) };
                let host = ntop(
                    libc::AF_INET,
                    (&sin.sin_addr as *const libc::in_addr).cast(),
                )?;
                let port = u16::from_be(sin.sin_port);
                Ok(PyTuple::new(
                    py,
                    [
                        PyString::new(py, &host).into_any(),
                        port.into_pyobject(py)?.into_any(),
                    ],
                )?
                .into_any())
            }
            libc::AF_INET6 => {
                // SAFETY: the kernel wrote a sockaddr_in6 for this family.
                let sin6 = unsafe { &*(&self.storage as *const _ as *const libc::sockaddr_in6) };
                let host = ntop(
                    libc::AF_INET6,
                    (&sin6.sin6_addr as *const libc::in6_addr).cast(),
                )?;
                Ok(PyTuple::new(
                    py,
                    [
                        PyString::new(py, &host).into_any(),
                        u16::from_be(sin6.sin6_port).into_pyobject(py)?.into_any(),
                        u32::from_be(sin6.sin6_flowinfo)
                            .into_pyobject(py)?
                            .into_any(),
                        sin6.sin6_scope_id.into_pyobject(py)?.into_any(),
                    ],
                )?
                .into_any())
            }
            libc::AF_UNIX => {
                // SAFETY: the kernel wrote a sockaddr_un for this family.
                let sun = unsafe { &*(&self.storage as *const _ as *const libc::sockaddr_un) };
                let path_len = (self.len as usize)
                    .saturating_sub(SUN_PATH_OFFSET)
                    .min(sun.sun_path.len());
                // SAFETY: sun_path is `c_char` storage of at least `path_len` bytes.
                let path: &[u8] =
                    unsafe { std::slice::from_raw_parts(sun.sun_path.as_ptr().cast(), path_len) };
                if path.first() == Some(&0) {
                    // Linux abstract namespace: every byte counts, NULs included.
                    return Ok(PyBytes::new(py, path).into_any());
                }
                let end = path.iter().position(|&b| b == 0).unwrap_or(path.len());
                // SAFETY: decodes `end` initialised bytes; a new reference or NULL.
                let s = unsafe {
                    ffi::PyUnicode_DecodeFSDefaultAndSize(
                        path.as_ptr().cast::<c_char>(),
                        end as ffi::Py_ssize_t,
                    )
                };
                if s.is_null() {
                    return Err(PyErr::fetch(py));
                }
                // SAFETY: a new, non-null reference.
                Ok(unsafe { Bound::from_owned_ptr(py, s) })
            }
            family => {
                // Families the transports do not create sockets for: CPython's generic
                // `(family, sa_data)` form.
                // SAFETY: every sockaddr starts with the generic header.
                let sa = unsafe { &*(&self.storage as *const _ as *const libc::sockaddr) };
                // SAFETY: sa_data is plain `c_char` storage.
                let data: &[u8] = unsafe {
                    std::slice::from_raw_parts(sa.sa_data.as_ptr().cast(), sa.sa_data.len())
                };
                Ok(PyTuple::new(
                    py,
                    [
                        family.into_pyobject(py)?.into_any(),
                        PyBytes::new(py, data).into_any(),
                    ],
                )?
                .into_any())
            }
        }
    }

    /// The sockaddr for `addr` on a socket of `family`, when it is one of the forms
    /// converted here with the socket module's exact result; `None` otherwise (the
    /// caller then goes through the socket object).
    pub fn from_python(family: i32, addr: &Bound<'_, PyAny>) -> Option<SockAddr> {
        match family {
            libc::AF_INET => inet4(addr),
            libc::AF_INET6 => inet6(addr),
            libc::AF_UNIX => unix(addr),
            _ => None,
        }
    }
}

fn c_int_family(f: libc::sa_family_t) -> i32 {
    i32::from(f)
}

fn ntop(family: i32, src: *const libc::c_void) -> PyResult<String> {
    let mut buf = [0 as c_char; INET6_ADDRSTRLEN];
    // SAFETY: `src` points to an in_addr/in6_addr matching `family`; `buf` is large
    // enough for either textual form.
    let r = unsafe { inet_ntop(family, src, buf.as_mut_ptr(), buf.len() as _) };
    if r.is_null() {
        return Err(crate::errors::os_error(std::io::Error::last_os_error()));
    }
    // SAFETY: inet_ntop wrote a NUL-terminated string into `buf`.
    Ok(unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned())
}

/// `host` of an address tuple, when it is an exact `str` that `inet_pton` accepts
/// (CPython's `setipaddr` tries exactly that before resolving a name).
fn pton(family: i32, host: &Bound<'_, PyAny>, dst: *mut libc::c_void) -> Option<()> {
    if !host.is_exact_instance_of::<PyString>() {
        return None;
    }
    let s = host.cast::<PyString>().ok()?.to_str().ok()?;
    let c = CString::new(s).ok()?;
    // SAFETY: `c` is NUL-terminated; `dst` has room for the family's address.
    (unsafe { inet_pton(family, c.as_ptr(), dst) } == 1).then_some(())
}

/// An exact `int` within `0..=max`: what `getsockaddrarg` accepts without an error.
fn small_int(obj: &Bound<'_, PyAny>, max: u32) -> Option<u32> {
    if !obj.is_exact_instance_of::<PyInt>() {
        return None;
    }
    obj.extract::<u32>().ok().filter(|v| *v <= max)
}

/// An exact tuple's items, when their number is within `min..=max`.
fn tuple_items<'py>(
    addr: &Bound<'py, PyAny>,
    min: usize,
    max: usize,
) -> Option<Vec<Bound<'py, PyAny>>> {
    if !addr.is_exact_instance_of::<PyTuple>() {
        return None;
    }
    let t = addr.cast::<PyTuple>().ok()?;
    (min..=max).contains(&t.len()).then(|| t.iter().collect())
}

fn inet4(addr: &Bound<'_, PyAny>) -> Option<SockAddr> {
    let items = tuple_items(addr, 2, 2)?;
    let port = small_int(&items[1], 0xffff)?;
    let mut out = SockAddr::empty();
    // SAFETY: sockaddr_in fits in sockaddr_storage, which is suitably aligned.
    let sin = unsafe { &mut *(&mut out.storage as *mut _ as *mut libc::sockaddr_in) };
    pton(
        libc::AF_INET,
        &items[0],
        (&mut sin.sin_addr as *mut libc::in_addr).cast(),
    )?;
    sin.sin_family = libc::AF_INET as libc::sa_family_t;
    sin.sin_port = (port as u16).to_be();
    out.len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    Some(out)
}

fn inet6(addr: &Bound<'_, PyAny>) -> Option<SockAddr> {
    let items = tuple_items(addr, 2, 4)?;
    let port = small_int(&items[1], 0xffff)?;
    let flowinfo = match items.get(2) {
        Some(f) => small_int(f, 0xfffff)?,
        None => 0,
    };
    let scope_id = match items.get(3) {
        Some(s) => small_int(s, u32::MAX)?,
        None => 0,
    };
    let mut out = SockAddr::empty();
    // SAFETY: sockaddr_in6 fits in sockaddr_storage, which is suitably aligned.
    let sin6 = unsafe { &mut *(&mut out.storage as *mut _ as *mut libc::sockaddr_in6) };
    pton(
        libc::AF_INET6,
        &items[0],
        (&mut sin6.sin6_addr as *mut libc::in6_addr).cast(),
    )?;
    sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    sin6.sin6_port = (port as u16).to_be();
    sin6.sin6_flowinfo = flowinfo.to_be();
    sin6.sin6_scope_id = scope_id;
    out.len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    Some(out)
}

fn unix(addr: &Bound<'_, PyAny>) -> Option<SockAddr> {
    let py = addr.py();
    let encoded;
    let path: &[u8] = if addr.is_exact_instance_of::<PyBytes>() {
        addr.cast::<PyBytes>().ok()?.as_bytes()
    } else if addr.is_exact_instance_of::<PyString>() {
        // SAFETY: `addr` is a str; the result is a new reference to bytes, or NULL.
        let b = unsafe { ffi::PyUnicode_EncodeFSDefault(addr.as_ptr()) };
        if b.is_null() {
            // Left to the socket object, which raises the same error itself.
            drop(PyErr::take(py));
            return None;
        }
        // SAFETY: a new, non-null reference.
        encoded = unsafe { Bound::from_owned_ptr(py, b) }
            .cast_into::<PyBytes>()
            .ok()?;
        encoded.as_bytes()
    } else {
        return None;
    };
    let mut out = SockAddr::empty();
    // SAFETY: sockaddr_un fits in sockaddr_storage, which is suitably aligned.
    let sun = unsafe { &mut *(&mut out.storage as *mut _ as *mut libc::sockaddr_un) };
    let abstract_name = path.first().is_none_or(|&b| b == 0);
    // A regular path needs room for its terminating NUL; too long is the socket
    // module's error to raise.
    if path.len() > sun.sun_path.len() || (!abstract_name && path.len() == sun.sun_path.len()) {
        return None;
    }
    if !abstract_name && path.contains(&0) {
        return None;
    }
    sun.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &s) in sun.sun_path.iter_mut().zip(path) {
        *d = s as c_char;
    }
    let extra = usize::from(!abstract_name);
    out.len = (SUN_PATH_OFFSET + path.len() + extra) as libc::socklen_t;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_as_compares_length_and_bytes() {
        let mut a = SockAddr::empty();
        a.len = 4;
        let mut b = a;
        assert!(a.same_as(&b));
        b.len = 5;
        assert!(!a.same_as(&b));
        b.len = 4;
        b.storage.ss_family = 7;
        assert!(!a.same_as(&b));
    }
}
